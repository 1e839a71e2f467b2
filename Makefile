# `make bench`: pacsgrid vs Orthanc vs DCMTK storescp (and repair / migrate folder vs cp -r +
# sync), results in bench/results/<date>.md. `make bench ARGS="--resume"` continues an
# interrupted run; `make bench ARGS="--phases latency,repair"` measures some phases only (disk,
# ingest, latency, repair, migrate, find, retrieve); `make bench-smoke` checks the harness
# in seconds; `make profile` profiles pacsgrid's ingest with py-spy;
# `make ab ARGS="--build mine=/tmp/wt/src"` compares builds of pacsgrid with each other and
# Orthanc (add --scenario latency, repair or migrate for those instead of ingest).
# scripts/bench does the same on a machine without make.
# `make powercut ARGS="--cuts 1000 --seed 7"`: the long power-cut run of the archive
# (docs/powercut.md; needs root for its FUSE mount).
# `make test` installs what the tests need, runs the linters and the whole suite; `make test-fast`
# the same without the tests marked slow (the edit loop, docs/development.md).
# `make fuzz ARGS="--seconds 600"` fuzzes the DICOM decoders for ten minutes per fuzzer
# (add --sockets 2000 for PDU sequences against a server it starts); scripts/fuzz does the same.
# `make mutate ARGS="--module wal"`: mutation testing of one module of the durable core
# (scripts/mutate; CPU heavy, at the lowest priority; not part of the test suite).

.PHONY: bench bench-smoke profile ab test test-fast powercut fuzz mutate

bench:
	./scripts/bench $(ARGS)

bench-smoke:
	./scripts/bench --plan smoke --rounds 1 $(ARGS)

profile:
	./scripts/bench profile $(ARGS)

ab:
	./scripts/bench ab --build current=src $(ARGS)

test:
	./scripts/test $(ARGS)

test-fast:
	./scripts/test --fast $(ARGS)

powercut:
	bash -c '. scripts/lib.sh && apt_install libfuse2 && ensure_venv test'
	.venv/bin/python -m tests.powercut $(ARGS)

fuzz:
	./scripts/fuzz $(ARGS)

mutate:
	./scripts/mutate $(ARGS)
