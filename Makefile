# The two commands of the README's Quick start.
.PHONY: run test

## Build and serve the app at http://127.0.0.1:3000 (SQLite, dev sign-in on).
run:
	@scripts/run.sh

## Install what is missing, then run lints, every Rust test and the browser tests.
test:
	@scripts/test.sh
