//! What a request asks of the server, below HTTP and above the engine: the one path each kind of
//! work takes whoever asks for it (a route, the CLI, `eval`, a job). Handlers map a request to a
//! service call and its result to a response; they never orchestrate.

pub mod attack;

pub use attack::{AttackOrder, AttackReport, AttackService, RemoteRun, ServiceError, Transfer, Verified};
