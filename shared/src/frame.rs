//! Length-prefixed frames: a 4-byte big-endian length, then that many payload bytes.
//!
//! A length over [`MAX_FRAME`] is refused before anything is allocated for it, so a peer can
//! never make us reserve more than the limit. Payload buffers are zeroized when dropped, since
//! they may hold secrets.

use std::io::{self, Read, Write};

use zeroize::Zeroizing;

/// The largest payload a frame may carry (64 KiB). Registry credentials are far smaller.
pub const MAX_FRAME: usize = 64 * 1024;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Bytes of a payload read before the rest of an announced length is allocated: a peer must
/// send data, not only a header, to make us hold a large buffer.
pub const FIRST_CHUNK: usize = 4096;

/// A frame payload; zeroized on drop.
pub type Payload = Zeroizing<Vec<u8>>;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
    },
    /// The stream ended cleanly before a new frame started.
    #[error("connection closed by peer")]
    Closed,
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// Any other I/O failure, timeouts included.
    #[error("frame I/O failed")]
    Io(#[source] io::Error),
}

/// Checks an announced length against the limit.
pub fn check_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::FrameTooLarge { len });
    }
    Ok(len)
}

/// Builds the header for a payload, refusing payloads over the limit.
pub fn header_for(payload: &[u8]) -> Result<[u8; HEADER_LEN], FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::FrameTooLarge { len: payload.len() });
    }
    // The length fits in u32: it is at most MAX_FRAME.
    Ok((payload.len() as u32).to_be_bytes())
}

pub(crate) fn map_eof(err: io::Error, started: bool) -> FrameError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        if started { FrameError::Truncated } else { FrameError::Closed }
    } else {
        FrameError::Io(err)
    }
}

/// Reads one frame from a blocking reader.
pub fn read_frame<R: Read>(reader: &mut R) -> Result<Payload, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]) {
            Ok(0) => return Err(if got == 0 { FrameError::Closed } else { FrameError::Truncated }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = check_len(header)?;
    let mut payload = Zeroizing::new(vec![0u8; len.min(FIRST_CHUNK)]);
    reader.read_exact(&mut payload).map_err(|e| map_eof(e, true))?;
    if len > FIRST_CHUNK {
        let mut full = grow(&payload, len);
        reader.read_exact(&mut full[FIRST_CHUNK..]).map_err(|e| map_eof(e, true))?;
        payload = full;
    }
    Ok(payload)
}

/// A buffer of `len` bytes starting with `first` (which is zeroized when dropped).
pub(crate) fn grow(first: &[u8], len: usize) -> Payload {
    let mut full = Zeroizing::new(vec![0u8; len]);
    full[..first.len()].copy_from_slice(first);
    full
}

/// Writes one frame to a blocking writer (header and payload in one write where possible).
pub fn write_frame<W: Write>(writer: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    let header = header_for(payload)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(HEADER_LEN + payload.len()));
    buf.extend_from_slice(&header);
    buf.extend_from_slice(payload);
    writer.write_all(&buf).map_err(FrameError::Io)?;
    writer.flush().map_err(FrameError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        assert_eq!(buf, b"\x00\x00\x00\x05hello");
        let got = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(&got[..], b"hello");
    }

    #[test]
    fn oversized_header_is_refused_without_allocating() {
        let buf = [0xffu8, 0xff, 0xff, 0xff];
        match read_frame(&mut &buf[..]) {
            Err(FrameError::FrameTooLarge { len }) => assert_eq!(len, u32::MAX as usize),
            other => panic!("unexpected {other:?}"),
        }
        let over = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(read_frame(&mut &over[..]), Err(FrameError::FrameTooLarge { .. })));
        let mut sink = Vec::new();
        assert!(matches!(
            write_frame(&mut sink, &vec![0u8; MAX_FRAME + 1]),
            Err(FrameError::FrameTooLarge { .. })
        ));
        assert!(sink.is_empty());
    }

    #[test]
    fn limit_itself_is_allowed() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &vec![7u8; MAX_FRAME]).unwrap();
        assert_eq!(read_frame(&mut &buf[..]).unwrap().len(), MAX_FRAME);
    }

    #[test]
    fn eof_cases() {
        assert!(matches!(read_frame(&mut &b""[..]), Err(FrameError::Closed)));
        assert!(matches!(read_frame(&mut &b"\x00\x00"[..]), Err(FrameError::Truncated)));
        assert!(matches!(read_frame(&mut &b"\x00\x00\x00\x05hel"[..]), Err(FrameError::Truncated)));
    }
}
