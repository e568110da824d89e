//! The integration suite, one test binary: each module is one concern's tests against the real
//! binary, models and partners. One binary because every test target links libtorch: 25 of them
//! cost minutes of compiling and linking per build. Run one module with
//! `cargo test --release --test suite -- docs::` (the partner tier needs `--include-ignored`).

mod common;

mod attack_route;
mod attacks;
mod bounds;
mod container;
mod default_model;
mod deploy;
mod docs;
mod durability;
mod engine;
mod eval;
mod fuzz;
mod hostile;
mod http_api;
mod jobs;
mod matrix;
mod mlserver;
mod model_add;
mod operations;
mod remotes;
mod repository;
mod studies;
mod studio;
mod triton_client;
