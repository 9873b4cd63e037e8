//! The first bytes a client sidecar sends inside the mTLS stream: which
//! port of the destination pod the application wanted. Seven bytes:
//! magic `SKEP`, version 1, port (big endian).

use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAGIC: [u8; 4] = *b"SKEP";
pub const VERSION: u8 = 1;
pub const LEN: usize = 7;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("the stream does not start with the mesh header")]
    Magic,
    #[error("mesh header version {0} is not supported (this sidecar speaks {VERSION})")]
    Version(u8),
    #[error("the header names port 0")]
    Port,
    #[error("reading the mesh header: {0}")]
    Io(String),
}

pub fn encode(port: u16) -> [u8; LEN] {
    let p = port.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION, p[0], p[1]]
}

pub fn decode(bytes: &[u8; LEN]) -> Result<u16, HeaderError> {
    if bytes[..4] != MAGIC {
        return Err(HeaderError::Magic);
    }
    if bytes[4] != VERSION {
        return Err(HeaderError::Version(bytes[4]));
    }
    match u16::from_be_bytes([bytes[5], bytes[6]]) {
        0 => Err(HeaderError::Port),
        p => Ok(p),
    }
}

/// Reads exactly the header (nothing of the payload after it).
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<u16, HeaderError> {
    let mut buf = [0u8; LEN];
    r.read_exact(&mut buf)
        .await
        .map_err(|e| HeaderError::Io(e.to_string()))?;
    decode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        assert_eq!(decode(&encode(8080)), Ok(8080));
        assert_eq!(decode(b"GET / H"), Err(HeaderError::Magic));
        let mut v2 = encode(80);
        v2[4] = 2;
        assert_eq!(decode(&v2), Err(HeaderError::Version(2)));
        assert_eq!(decode(&encode(0)), Err(HeaderError::Port));
    }
}
