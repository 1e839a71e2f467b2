"""`pacsgrid drill`: a fault drill against a small deployment it starts on this machine.

Kept out of the archive's core: the drill starts real programs (several `pacsgrid serve`
nodes, HAProxy, PostgreSQL under Patroni with etcd, a SeaweedFS cluster) and drives the
archive only as a user would, through DICOM and the command line. Its process launchers
(`seaweed`, `patroni`) are also what the test suite starts its clusters with.
"""
