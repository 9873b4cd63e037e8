//! Where in an object the decoder or the encoder is: the field path its
//! errors name, and the nesting depth it limits.

use super::{ProtobufError, schema};

/// How deep objects may nest (JSONSchemaProps can recurse).
const MAX_DEPTH: usize = 100;

pub(super) struct Ctx {
    pub(super) path: Vec<String>,
    pub(super) depth: usize,
}

impl Ctx {
    /// The schema index of the message named `message` (as in the schema:
    /// `api.core.v1.Pod`) and a context at its top level, which errors
    /// name by the short name (`Pod`).
    pub(super) fn for_message(message: &str) -> Result<(u16, Self), ProtobufError> {
        if !schema::available() {
            return Err(ProtobufError::NoSchema);
        }
        let index = schema::by_name(message).ok_or_else(|| ProtobufError::UnknownKind {
            api_version: String::new(),
            kind: message.to_owned(),
        })?;
        let ctx = Self {
            path: vec![message.rsplit('.').next().unwrap_or(message).to_owned()],
            depth: 0,
        };
        Ok((index, ctx))
    }

    pub(super) fn err(&self, message: impl Into<String>) -> ProtobufError {
        ProtobufError::Malformed {
            path: if self.path.is_empty() {
                "the top level".into()
            } else {
                self.path.join(".")
            },
            message: message.into(),
        }
    }

    /// Enters a nested message (the caller leaves it with `depth -= 1`);
    /// an error beyond [`MAX_DEPTH`] levels.
    pub(super) fn descend(&mut self) -> Result<(), ProtobufError> {
        if self.depth >= MAX_DEPTH {
            return Err(ProtobufError::TooDeep(MAX_DEPTH));
        }
        self.depth += 1;
        Ok(())
    }
}
