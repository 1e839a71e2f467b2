"""Background work that keeps the archive whole: repair, fixity audit, cache tier.

Every job keeps its progress in the index (work queue, copy states, job_state), so an
interrupted run continues where it stopped, and runs either on demand (`pacsgrid repair`,
`pacsgrid audit`) or as a node component of `pacsgrid serve`.
"""
