# `make bench`: pacsgrid vs Orthanc vs DCMTK storescp, results in bench/results/<date>.md.
# `make bench ARGS="--resume"` continues an interrupted run; `make bench-smoke` checks the
# harness in seconds; `make profile` profiles pacsgrid's ingest with py-spy;
# `make ab ARGS="--build mine=/tmp/wt/src"` compares builds of pacsgrid with each other and Orthanc.
# scripts/bench does the same on a machine without make.

.PHONY: bench bench-smoke profile ab test

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
