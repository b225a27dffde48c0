# Sourced by the scripts: puts the project's tools first on PATH so cargo-leptos finds them
# instead of downloading its own.
export PATH="$PWD/end2end/node_modules/.bin:$HOME/.cargo/bin:$PATH"
