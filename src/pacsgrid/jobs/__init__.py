"""Background work of a node: repair, fixity audit, cache tier, forwarding.

Every job keeps its progress in the index (work queue, copy states, job_state), so an
interrupted run continues where it stopped, and runs either on demand (`pacsgrid repair`,
`pacsgrid audit`, `pacsgrid forward retry`) or as a node component of `pacsgrid serve`.
"""
