//! Frames, sealed frames and typed messages over tokio's async I/O traits (no runtime needed
//! by this crate; the spawned reader and writer run on the caller's).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::frame::{
    FIRST_CHUNK, FrameError, HEADER_LEN, Payload, check_len, grow, header_for, map_eof,
};
use crate::seal::{MAX_PLAINTEXT, Opener, SealError, Sealer};

/// Reads one frame. Cancel-safe only between frames: drop the stream if a read is cancelled.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Payload, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]).await {
            Ok(0) => {
                return Err(if got == 0 { FrameError::Closed } else { FrameError::Truncated });
            }
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = check_len(header)?;
    let mut payload = Zeroizing::new(vec![0u8; len.min(FIRST_CHUNK)]);
    reader.read_exact(&mut payload).await.map_err(|e| map_eof(e, true))?;
    if len > FIRST_CHUNK {
        let mut full = grow(&payload, len);
        reader.read_exact(&mut full[FIRST_CHUNK..]).await.map_err(|e| map_eof(e, true))?;
        payload = full;
    }
    Ok(payload)
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    let header = header_for(payload)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(HEADER_LEN + payload.len()));
    buf.extend_from_slice(&header);
    buf.extend_from_slice(payload);
    writer.write_all(&buf).await.map_err(FrameError::Io)?;
    writer.flush().await.map_err(FrameError::Io)
}

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Framing or I/O.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Encoding or decoding.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// A sealed frame that does not open.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Reads one frame and decodes it as a `T`.
pub async fn read_msg<T, R>(reader: &mut R) -> Result<T, MessageError>
where
    T: serde::de::DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let payload = read_frame(reader).await?;
    Ok(crate::codec::decode(&payload)?)
}

/// Reads one sealed frame, opens it and decodes it as a `T`.
pub async fn read_sealed<T, R>(reader: &mut R, opener: &mut Opener) -> Result<T, MessageError>
where
    T: serde::de::DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let frame = read_frame(reader).await?;
    let payload = opener.open(&frame)?;
    Ok(crate::codec::decode(&payload)?)
}

/// Reads sealed messages from `reader` on a task of their own until the stream ends or
/// fails (a frame that does not open included), and hands them over through the returned
/// channel (the last item is the error that ended it). Reading apart means `select!` in
/// the consumer never cuts a frame in half. The task stops when the returned guard is
/// dropped.
pub fn spawn_reader<T, R>(
    mut reader: R,
    mut opener: Opener,
) -> (tokio::sync::mpsc::Receiver<Result<T, MessageError>>, ReaderTask)
where
    T: serde::de::DeserializeOwned + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let msg = read_sealed::<T, _>(&mut reader, &mut opener).await;
            let stop = msg.is_err();
            if tx.send(msg).await.is_err() || stop {
                break;
            }
        }
    });
    (rx, ReaderTask(task))
}

/// Stops its reader (or writer) task when dropped.
#[derive(Debug)]
pub struct ReaderTask(tokio::task::JoinHandle<()>);

impl Drop for ReaderTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a message could not be queued for the writer task.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The message cannot be encoded into one frame.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// The message does not fit one sealed frame.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The queue is full: the peer stopped reading.
    #[error("the peer stopped reading: {0} frames wait to be written")]
    Stalled(usize),
    /// The writer stopped (a write failed or missed its deadline).
    #[error("write failed: {0}")]
    Closed(String),
}

/// The sending side of a writer task: messages are encoded here and written there, in
/// order, each under a deadline. Queuing never waits.
#[derive(Debug, Clone)]
pub struct FrameQueue {
    tx: tokio::sync::mpsc::Sender<Payload>,
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    capacity: usize,
}

impl FrameQueue {
    /// Encodes `msg` and queues it (sealed by the writer, in the order written).
    pub fn send<T: serde::Serialize>(&self, msg: &T) -> Result<(), QueueError> {
        let payload = crate::codec::encode(msg)?;
        if payload.len() > MAX_PLAINTEXT {
            return Err(QueueError::Seal(SealError::FrameTooLarge { len: payload.len() }));
        }
        self.tx.try_send(payload).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => QueueError::Stalled(self.capacity),
            tokio::sync::mpsc::error::TrySendError::Closed(_) => QueueError::Closed(self.error()),
        })
    }

    /// Resolves when the writer task has stopped.
    pub async fn failed(&self) {
        self.tx.closed().await;
    }

    /// Why the writer stopped.
    pub fn error(&self) -> String {
        self.error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "the writer stopped".to_owned())
    }
}

/// Seals the frames queued on the returned [`FrameQueue`] (at most `capacity` waiting)
/// in the order they were queued and writes them to `writer` on a task of its own, each
/// write and flush bounded by `deadline`; the first failure or missed deadline stops it.
/// The task stops when the guard is dropped.
pub fn spawn_writer<W>(
    mut writer: W,
    mut sealer: Sealer,
    capacity: usize,
    deadline: std::time::Duration,
) -> (FrameQueue, ReaderTask)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let capacity = capacity.max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Payload>(capacity);
    let error = std::sync::Arc::new(std::sync::Mutex::new(None));
    let failed = error.clone();
    let task = tokio::spawn(async move {
        while let Some(payload) = rx.recv().await {
            let sealed = match sealer.seal(&payload) {
                Ok(sealed) => sealed,
                Err(e) => {
                    *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(e.to_string());
                    break;
                }
            };
            let why = match tokio::time::timeout(deadline, write_frame(&mut writer, &sealed)).await
            {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("a write took longer than {} ms", deadline.as_millis()),
            };
            *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
            break;
        }
        // Dropping the receiver here tells every sender (`failed` resolves).
    });
    (FrameQueue { tx, error, capacity }, ReaderTask(task))
}

/// Encodes `msg` and writes it as one frame.
pub async fn write_msg<T, W>(writer: &mut W, msg: &T) -> Result<(), MessageError>
where
    T: serde::Serialize,
    W: AsyncWrite + Unpin,
{
    let payload = crate::codec::encode(msg)?;
    Ok(write_frame(writer, &payload).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_writer_whose_peer_stops_reading_stalls_then_fails_by_its_deadline() {
        let (ours, _never_read) = tokio::io::duplex(16);
        let key = crate::key::LinkKey::from_bytes(&[1; 32]).unwrap();
        let session = crate::seal::Session::new(&key, b"t", crate::seal::Role::Host);
        let deadline = std::time::Duration::from_millis(200);
        let (queue, _task) = spawn_writer(ours, session.sealer, 4, deadline);
        let started = std::time::Instant::now();
        let mut stalled = false;
        for n in 0u64..100 {
            match queue.send(&n) {
                Ok(()) => {}
                Err(QueueError::Stalled(4)) => {
                    stalled = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(stalled, "the queue never filled");
        tokio::time::timeout(std::time::Duration::from_secs(2), queue.failed())
            .await
            .expect("the writer did not give up by its deadline");
        assert!(started.elapsed() >= std::time::Duration::from_millis(200));
        assert!(queue.error().contains("longer than 200 ms"), "{}", queue.error());
        assert!(matches!(queue.send(&1u64), Err(QueueError::Closed(_))));
    }
}
