# Conveniences over scripts/ (the scripts are the source of truth; they need only bash).
.PHONY: setup run test openapi bench fmt clippy
setup:
	scripts/setup
run:
	scripts/run
test:
	scripts/test
openapi: setup
	target/release/labelfool openapi -o openapi/openapi.json
fmt:
	cargo fmt --all
clippy:
	. scripts/env.sh && cargo clippy --release --all-targets -- -D warnings
