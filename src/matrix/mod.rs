//! Building class distance matrices offline — from features (Hausdorff
//! between the classes' image sets, blockwise, sharded), from WordNet — into the type a model
//! loads ([`crate::model::matrix::DistanceMatrix`]).

pub mod build;
pub mod hausdorff;
pub mod semantic;
