//! LabelFool server: image classification and adversarial images whose wrong label is hard for a
//! person to notice (the LabelFool method), served over HTTP.
//!
//! Layers, outermost first: [`http`] (axum routes, one error type mapped to status codes) →
//! [`engine`] (queue, batcher, the worker thread that owns the device) → [`model`], [`attack`],
//! [`matrix`]. [`remote`] speaks to models behind other servers' Open Inference Protocol
//! endpoints. [`cli`] drives the same engine offline; [`eval`] compares attacks. [`jobs`] runs
//! evals in the background on SQLite; [`study`] turns a finished job into the paper's human study.

pub mod attack;
pub mod charts;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod engine;
pub mod eval;
pub mod http;
pub mod imaging;
pub mod jobs;
pub mod matrix;
pub mod model;
pub mod remote;
pub mod service;
pub mod study;
pub mod telemetry;
pub mod wordnet;
