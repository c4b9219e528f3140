//! The payload codec (postcard), kept behind these two functions so it could change.

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::frame::MAX_FRAME;

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not a valid message of the expected type.
    #[error("malformed message: {0}")]
    MessageDecode(#[source] postcard::Error),
    /// The message was followed by extra bytes.
    #[error("malformed message: {0} trailing bytes")]
    TrailingBytes(usize),
    /// The message could not be encoded.
    #[error("message encoding failed: {0}")]
    MessageEncode(#[source] postcard::Error),
    /// The encoded message would not fit in a frame.
    #[error("message of {0} bytes exceeds the frame limit")]
    MessageTooLarge(usize),
}

/// Encodes a message; the buffer is zeroized when dropped.
pub fn encode<T: Serialize>(msg: &T) -> Result<Zeroizing<Vec<u8>>, CodecError> {
    let bytes = Zeroizing::new(postcard::to_allocvec(msg).map_err(CodecError::MessageEncode)?);
    if bytes.len() > MAX_FRAME {
        return Err(CodecError::MessageTooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes a whole payload as one message; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (msg, rest) = postcard::take_from_bytes(bytes).map_err(CodecError::MessageDecode)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}
