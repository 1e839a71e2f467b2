"""Background and batch work of a node: repair, fixity audit, cache tier, forwarding,
reindex, backups.

Every job keeps its progress in the index (work queue, copy states, job_state), so an
interrupted run continues where it stopped, and one node owns each work item or period. Jobs
run on demand (`pacsgrid repair`, `audit`, `reindex`, `backup`, `forward retry`) or as node
components of `pacsgrid serve`.
"""
