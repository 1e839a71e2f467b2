"""A power-cut test rig: a recording FUSE filesystem and a crash model over its history.

    history.py   the operation log (one record per mutating call the program made)
    fs.py        the FUSE passthrough that writes it (run as its own process)
    mount.py     starting and stopping that process, by PID
    model.py     the state a disk could be left in after a power cut at any point of a history
    archive.py   the archive's workload on the rig (pacsgrid serve + several C-STORE senders)
    check.py     recovery and checks of one cut state (C-FIND, C-GET, the site's files)
    __main__.py  the long run: python -m tests.powercut --cuts 1000 --seed 7

The history is recorded once per run; every cut is then computed offline from a prefix of it,
so hundreds of cuts cost one recording. A cut is reproducible from (history, seed, cut index).
docs/powercut.md says what the model assumes of a disk and what it leaves out.
"""
