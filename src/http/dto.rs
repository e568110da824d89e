//! Response pieces shared by several routes.

use serde::Serialize;
use utoipa::ToSchema;

use crate::model::ModelInfo;

/// A class of the model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClassRef {
    #[schema(example = 340)]
    pub index: usize,
    #[schema(example = "zebra")]
    pub label: String,
    /// WordNet id, for ImageNet-style class lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "n02391049")]
    pub wnid: Option<String>,
}

impl ClassRef {
    pub fn new(info: &ModelInfo, index: usize) -> Self {
        Self::from_list(info.classes(), index)
    }

    /// A class of any class list (a remote target's, for instance).
    pub fn from_list(classes: &crate::model::ClassList, index: usize) -> Self {
        let c = classes.get(index);
        Self {
            index,
            label: c.map(|c| c.label.clone()).unwrap_or_else(|| "?".into()),
            wnid: c.and_then(|c| c.wnid.clone()),
        }
    }
}

/// A class with the model's probability for it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClassPrediction {
    #[serde(flatten)]
    pub class: ClassRef,
    #[schema(example = 0.97)]
    pub probability: f64,
}

impl ClassPrediction {
    pub fn new(info: &ModelInfo, index: usize, probability: f64) -> Self {
        Self { class: ClassRef::new(info, index), probability }
    }

    pub fn from_list(classes: &crate::model::ClassList, index: usize, probability: f64) -> Self {
        Self { class: ClassRef::from_list(classes, index), probability }
    }
}

/// A class with a distance (or expected distance) under the model's distance matrix.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClassDistance {
    #[serde(flatten)]
    pub class: ClassRef,
    /// D[class, reference] (preview, MLE branch) or Σ p̂j·D[class, j] (weighted branch).
    #[schema(example = 0.21)]
    pub distance: f64,
}

/// Raw image bytes: a PNG answer, and (in the document) a raw image request body.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ImageBytes(pub Vec<u8>);

impl axum::response::IntoResponse for ImageBytes {
    fn into_response(self) -> axum::response::Response {
        self.0.into_response()
    }
}
