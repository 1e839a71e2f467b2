# `make bench`: pacsgrid vs Orthanc vs DCMTK storescp, results in bench/results/<date>.md.
# `make bench ARGS="--resume"` continues an interrupted run; `make bench-smoke` checks the
# harness in seconds; `make profile` profiles pacsgrid's ingest with py-spy.
# scripts/bench does the same on a machine without make.

.PHONY: bench bench-smoke profile test

bench:
	./scripts/bench $(ARGS)

bench-smoke:
	./scripts/bench --plan smoke --rounds 1 $(ARGS)

profile:
	./scripts/bench profile $(ARGS)

test:
	./scripts/test $(ARGS)
