//! `config.pbtxt` → Triton's `ModelConfig`, with the types prost generates from the vendored
//! `model_config.proto` and prost-reflect's protobuf text-format parser.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

/// Triton's `inference` protobuf package (`ModelConfig`, `ModelInput`, `DataType`, …).
#[allow(clippy::all, missing_docs)]
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

pub use inference::ModelConfig;

fn descriptor() -> &'static MessageDescriptor {
    static DESCRIPTOR: OnceLock<MessageDescriptor> = OnceLock::new();
    DESCRIPTOR.get_or_init(|| {
        let pool = DescriptorPool::decode(&include_bytes!(concat!(env!("OUT_DIR"), "/model_config.bin"))[..])
            .expect("the descriptor set build.rs wrote decodes");
        pool.get_message_by_name("inference.ModelConfig").expect("model_config.proto defines inference.ModelConfig")
    })
}

/// prost-reflect (0.16) wants a `:` before a list of messages, which the text-format spec (and
/// Triton's own C++ parser, and every Triton example: `input [ { … } ]`) leaves optional. When the
/// parser stops at exactly that place, the colon is inserted at the offset the parser reports and
/// parsing starts again: the parser finds the place, no pattern matching on the text. Bounded:
/// each retry fixes one `[`, and there are only so many.
const MISSING_LIST_COLON: &str = "expected ':' or a message value, but found '['";

/// Parses a `config.pbtxt`; the error names the line and column.
pub fn parse(text: &str) -> Result<ModelConfig, String> {
    let mut text = text.to_string();
    for _ in 0..=text.matches('[').count() {
        match DynamicMessage::parse_text_format(descriptor().clone(), &text) {
            Ok(message) => return message.transcode_to::<ModelConfig>().map_err(|e| e.to_string()),
            Err(e) => {
                let offset = miette::Diagnostic::labels(&e).and_then(|mut l| l.next()).map(|l| l.offset());
                match offset {
                    Some(at) if e.to_string() == MISSING_LIST_COLON && text.is_char_boundary(at) => {
                        text.insert(at, ':');
                    }
                    _ => return Err(locate(&text, offset, &e.to_string())),
                }
            }
        }
    }
    Err("config.pbtxt: too many list fixes".into())
}

fn locate(text: &str, offset: Option<usize>, message: &str) -> String {
    match offset.filter(|o| *o <= text.len() && text.is_char_boundary(*o)) {
        Some(o) => {
            let before = &text[..o];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: {message}")
        }
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRITON_EXAMPLE: &str = r#"
# As Triton's documentation writes them: lists of messages without a colon.
name: "resnet"
platform: "pytorch_libtorch"
max_batch_size: 8
input [
  {
    name: "INPUT__0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  {
    name: "OUTPUT__0"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
instance_group [ { kind: KIND_CPU count: 2 } ]
parameters { key: "DISABLE_OPTIMIZED_EXECUTION" value { string_value: "true" } }
"#;

    #[test]
    fn parses_the_documented_form() {
        let c = parse(TRITON_EXAMPLE).unwrap();
        assert_eq!(c.name, "resnet");
        assert_eq!(c.platform, "pytorch_libtorch");
        assert_eq!(c.max_batch_size, 8);
        assert_eq!(c.input.len(), 1);
        assert_eq!(c.input[0].dims, vec![3, 224, 224]);
        assert_eq!(c.input[0].data_type(), inference::DataType::TypeFp32);
        assert_eq!(c.output[0].label_filename, "labels.txt");
        assert_eq!(c.instance_group[0].count, 2);
        assert_eq!(c.parameters["DISABLE_OPTIMIZED_EXECUTION"].string_value, "true");
    }

    #[test]
    fn colon_form_and_repeated_fields_agree() {
        let a = parse("input: [ { name: \"a\" dims: [1, 2] } ]").unwrap();
        let b = parse("input { name: \"a\" dims: 1 dims: 2 }").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn errors_name_the_place() {
        let e = parse("name: \"m\"\nmax_batch_size: \"eight\"\n").unwrap_err();
        assert!(e.starts_with("line 2, column 17"), "{e}");
        let e = parse("name: \"m\"\nbogus_field: 1\n").unwrap_err();
        assert!(e.contains("bogus_field"), "{e}");
        // A list that is not a message list still needs its colon: the fix does not apply.
        let e = parse("name: \"m\" input [ 1 ]").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }
}
