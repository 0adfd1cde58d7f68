//! The read side of a server's WebSocket (RFC 6455 §5): client frames in, messages out.
//!
//! Used instead of tungstenite's reader for memory. tungstenite reserves a frame's whole length
//! on top of what it has already buffered, so when frames wait in the socket (a loaded server)
//! its buffer doubles and stays doubled: 2 KiB became 8 KiB per session at 1,000 clients
//! (BENCHMARKS.md). It also zeroes its read size before every read. This reader keeps one
//! buffer of the configured read size, reads into it as it is, moves a partial frame to the
//! front instead of growing, grows only for a frame larger than the buffer and shrinks back
//! after it. Payloads are unmasked as they are copied out, so a message owns exactly its bytes.
//!
//! Yields what tungstenite's stream yields, with its error types: data messages (fragments
//! joined), pings and pongs (answering is the caller's: see `SessionShared::queue_pong`), and
//! a close, after which the stream ends. No extensions are negotiated, so reserved bits are
//! errors.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// Control frames carry at most this much (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

pub struct FrameReader<R> {
    io: R,
    /// Bytes read and not yet consumed are `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    read_size: usize,
    max_message: usize,
    /// A fragmented message so far: whether it is text, and its payload.
    fragments: Option<(bool, Vec<u8>)>,
    /// A close arrived, the socket ended, or an error was returned: nothing more is read.
    done: bool,
}

/// A parsed frame header.
struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Read frames from `io` into a buffer of `read_size` bytes; messages (and frames) longer
    /// than `max_message` are refused with [`CapacityError::MessageTooLong`].
    pub fn new(io: R, read_size: usize, max_message: usize) -> FrameReader<R> {
        let read_size = read_size.max(MAX_HEADER);
        FrameReader {
            io,
            buf: vec![0; read_size],
            start: 0,
            end: 0,
            read_size,
            max_message,
            fragments: None,
            done: false,
        }
    }

    /// The next message, or `None` at the end (after a close, or a socket that ended cleanly).
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let header = match self.header() {
                Ok(header) => header,
                Err(error) => return self.fail(error),
            };
            let need = header
                .as_ref()
                .map_or(MAX_HEADER, |h| h.header_len + h.payload_len);
            if let Some(header) = header
                && self.end - self.start >= need
            {
                match self.take_frame(header) {
                    Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                    Ok(None) => continue,
                    Err(error) => return self.fail(error),
                }
            }
            self.make_room(need);
            let mut read = ReadBuf::new(&mut self.buf[self.end..]);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
                Ok(()) if read.filled().is_empty() => {
                    self.done = true;
                    // The client went away without a close (or in the middle of a frame).
                    return Poll::Ready(Some(Err(Error::Protocol(
                        ProtocolError::ResetWithoutClosingHandshake,
                    ))));
                }
                Ok(()) => self.end += read.filled().len(),
                Err(error) => return self.fail(Error::Io(error)),
            }
        }
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Message, Error>>> {
        self.done = true;
        Poll::Ready(Some(Err(error)))
    }

    /// The header at the front of the buffer, once all of it is there; checks what can be
    /// checked before the payload arrives.
    fn header(&self) -> Result<Option<Header>, Error> {
        let bytes = &self.buf[self.start..self.end];
        if bytes.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (bytes[0], bytes[1]);
        if first & 0x70 != 0 {
            return Err(Error::Protocol(ProtocolError::NonZeroReservedBits));
        }
        if second & 0x80 == 0 {
            return Err(Error::Protocol(ProtocolError::UnmaskedFrameFromClient));
        }
        let opcode = OpCode::from(first & 0x0f);
        let (extra, short) = match second & 0x7f {
            126 => (2, None),
            127 => (8, None),
            len => (0, Some(u64::from(len))),
        };
        let header_len = 2 + extra + 4;
        if bytes.len() < header_len {
            return Ok(None);
        }
        let len = short.unwrap_or_else(|| {
            bytes[2..2 + extra]
                .iter()
                .fold(0u64, |len, byte| len << 8 | u64::from(*byte))
        });
        if len > self.max_message as u64 {
            return Err(too_long(len, self.max_message));
        }
        let mask = bytes[2 + extra..header_len]
            .try_into()
            .expect("four bytes of mask");
        Ok(Some(Header {
            fin: first & 0x80 != 0,
            opcode,
            mask,
            header_len,
            payload_len: len as usize,
        }))
    }

    /// Consume a whole frame from the buffer; a message when it completes one.
    fn take_frame(&mut self, header: Header) -> Result<Option<Message>, Error> {
        let from = self.start + header.header_len;
        let payload = &self.buf[from..from + header.payload_len];
        self.start = from + header.payload_len;
        let message = match header.opcode {
            OpCode::Control(control) => {
                if !header.fin {
                    return Err(Error::Protocol(ProtocolError::FragmentedControlFrame));
                }
                if payload.len() > MAX_CONTROL_PAYLOAD {
                    return Err(Error::Protocol(ProtocolError::ControlFrameTooBig));
                }
                let payload = unmasked(payload, header.mask);
                match control {
                    Control::Ping => Some(Message::Ping(payload.into())),
                    Control::Pong => Some(Message::Pong(payload.into())),
                    Control::Close => {
                        self.done = true;
                        Some(Message::Close(close_frame(payload)?))
                    }
                    Control::Reserved(code) => {
                        return Err(Error::Protocol(ProtocolError::UnknownControlFrameType(
                            code,
                        )));
                    }
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some((_, so_far)) = self.fragments.as_mut() else {
                    return Err(Error::Protocol(ProtocolError::UnexpectedContinueFrame));
                };
                let size = so_far.len() + payload.len();
                if size > self.max_message {
                    return Err(too_long(size as u64, self.max_message));
                }
                unmask_into(so_far, payload, header.mask);
                if header.fin {
                    let (text, payload) = self.fragments.take().expect("a fragmented message");
                    Some(data_message(text, payload)?)
                } else {
                    None
                }
            }
            OpCode::Data(data @ (Data::Text | Data::Binary)) => {
                if self.fragments.is_some() {
                    return Err(Error::Protocol(ProtocolError::ExpectedFragment(data)));
                }
                let text = data == Data::Text;
                let payload = unmasked(payload, header.mask);
                if header.fin {
                    Some(data_message(text, payload)?)
                } else {
                    self.fragments = Some((text, payload));
                    None
                }
            }
            OpCode::Data(Data::Reserved(code)) => {
                return Err(Error::Protocol(ProtocolError::UnknownDataFrameType(code)));
            }
        };
        self.release();
        Ok(message)
    }

    /// Give back a buffer grown for a large frame once what is left fits the usual size.
    fn release(&mut self) {
        if self.buf.len() > self.read_size && self.end - self.start <= self.read_size {
            self.rebuffer(self.read_size);
        }
    }

    /// Move what is buffered to the front of a new buffer of `size` bytes.
    fn rebuffer(&mut self, size: usize) {
        let left = self.end - self.start;
        let mut buf = vec![0; size];
        buf[..left].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = buf;
        self.start = 0;
        self.end = left;
    }

    /// Make room to read all of a frame of `need` bytes, from the front of the buffer. What is
    /// held is less than a frame (a read happens only when no whole frame is buffered): moving
    /// it is a short copy, or none when the last frame was taken whole. Reading into the room
    /// behind it instead split most 20 ms frames in two reads, a system call each.
    fn make_room(&mut self, need: usize) {
        if need > self.buf.len() {
            // A frame larger than the buffer: grow to exactly its size.
            self.rebuffer(need);
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

impl<R: AsyncRead + Unpin> Stream for FrameReader<R> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_message(cx)
    }
}

fn too_long(size: u64, max_size: usize) -> Error {
    Error::Capacity(CapacityError::MessageTooLong {
        size: usize::try_from(size).unwrap_or(usize::MAX),
        max_size,
    })
}

fn unmasked(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    unmask_into(&mut out, payload, mask);
    out
}

/// Append `payload` to `out`, unmasked. Eight bytes at a time: the mask repeats every four.
fn unmask_into(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("eight bytes")) ^ wide;
        out.extend_from_slice(&word.to_ne_bytes());
    }
    // The remainder starts at a multiple of eight, so the mask starts over.
    out.extend(
        chunks
            .remainder()
            .iter()
            .zip(mask.iter().cycle())
            .map(|(byte, mask)| byte ^ mask),
    );
}

fn data_message(text: bool, payload: Vec<u8>) -> Result<Message, Error> {
    if text {
        let text = Utf8Bytes::try_from(payload).map_err(|error| Error::Utf8(error.to_string()))?;
        Ok(Message::Text(text))
    } else {
        Ok(Message::Binary(Bytes::from(payload)))
    }
}

fn close_frame(payload: Vec<u8>) -> Result<Option<CloseFrame>, Error> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Error::Protocol(ProtocolError::InvalidCloseSequence)),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason = Utf8Bytes::try_from(Bytes::from(payload).slice(2..))
                .map_err(|error| Error::Utf8(error.to_string()))?;
            Ok(Some(CloseFrame {
                code: CloseCode::from(code),
                reason,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A client's frame: `first` is FIN, RSV and opcode.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
        out
    }

    const TEXT: u8 = 0x81;
    const BINARY: u8 = 0x82;
    const CLOSE: u8 = 0x88;
    const PING: u8 = 0x89;

    async fn read_all(bytes: &[u8], read_size: usize, max: usize) -> Vec<Result<Message, Error>> {
        let mut reader = FrameReader::new(bytes, read_size, max);
        let mut out = Vec::new();
        while let Some(item) = reader.next().await {
            out.push(item);
        }
        out
    }

    #[tokio::test]
    async fn every_length_form_and_kind_is_read() {
        let long: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut bytes = frame(TEXT, "héllo".as_bytes());
        bytes.extend(frame(BINARY, &long[..300]));
        bytes.extend(frame(BINARY, &long));
        bytes.extend(frame(PING, b"p"));
        bytes.extend(frame(CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']));
        bytes.extend(frame(TEXT, b"after the close: never read"));
        let messages = read_all(&bytes, 2048, 1 << 20).await;
        let messages: Vec<Message> = messages.into_iter().map(Result::unwrap).collect();
        assert_eq!(messages.len(), 5);
        assert_eq!(messages[0], Message::text("héllo"));
        assert_eq!(messages[1], Message::binary(long[..300].to_vec()));
        assert_eq!(messages[2], Message::binary(long.clone()));
        assert_eq!(messages[3], Message::Ping(Bytes::from_static(b"p")));
        let Message::Close(Some(close)) = &messages[4] else {
            panic!("{:?}", messages[4]);
        };
        assert_eq!(u16::from(close.code), 1000);
        assert_eq!(close.reason.as_str(), "bye");
    }

    #[tokio::test]
    async fn fragments_are_joined_around_control_frames() {
        let mut bytes = frame(0x01, b"one ");
        bytes.extend(frame(PING, b""));
        bytes.extend(frame(0x00, b"two "));
        bytes.extend(frame(0x80, b"three"));
        let messages = read_all(&bytes, 256, 1 << 20).await;
        // Then the end of the bytes: a client gone without a close.
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(matches!(
            messages[2],
            Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake))
        ));
        assert_eq!(*messages[0].as_ref().unwrap(), Message::Ping(Bytes::new()));
        assert_eq!(
            *messages[1].as_ref().unwrap(),
            Message::text("one two three")
        );
    }

    /// The reason for this reader: with frames waiting, the buffer stays at the read size.
    #[tokio::test]
    async fn a_backlog_of_frames_does_not_grow_the_buffer() {
        let mut bytes = Vec::new();
        for i in 0..500usize {
            // 650 to 1,299 bytes, as the tutorial's JSON frames of 20 ms are (~900).
            let len = 650 + (i * 37) % 650;
            bytes.extend(frame(TEXT, &vec![b'a' + (i % 26) as u8; len]));
        }
        // A 3,000-byte frame grows the buffer, which then shrinks back.
        bytes.extend(frame(BINARY, &[9; 3_000]));
        bytes.extend(frame(BINARY, &[1; 10]));
        let mut reader = FrameReader::new(&bytes[..], 2048, 1 << 20);
        for i in 0..500usize {
            let message = reader.next().await.unwrap().unwrap();
            assert_eq!(message.len(), 650 + (i * 37) % 650);
            assert_eq!(reader.buf.len(), 2048, "after frame {i}");
        }
        assert_eq!(reader.next().await.unwrap().unwrap().len(), 3_000);
        assert_eq!(reader.buf.len(), 2048, "given back after the large frame");
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::binary(vec![1; 10])
        );
    }

    /// Reads what it is given, counting the reads.
    struct Counted<'a> {
        chunks: std::collections::VecDeque<&'a [u8]>,
        reads: usize,
    }

    impl AsyncRead for Counted<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
            if let Some(chunk) = self.chunks.front_mut() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                *chunk = &chunk[n..];
                if chunk.is_empty() {
                    self.chunks.pop_front();
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_frame_that_arrives_whole_takes_one_read() {
        // The tutorial's 20 ms JSON frames (~900 bytes) arriving one at a time, as a real-time
        // client sends them: one read each, whatever the earlier frames left in the buffer.
        let frames: Vec<Vec<u8>> = (0..50usize)
            .map(|i| frame(TEXT, &vec![b'a'; 880 + i % 40]))
            .collect();
        let mut reader = FrameReader::new(
            Counted {
                chunks: frames.iter().map(Vec::as_slice).collect(),
                reads: 0,
            },
            2048,
            1 << 20,
        );
        for i in 0..50usize {
            let message = reader.next().await.unwrap().unwrap();
            assert_eq!(message.len(), 880 + i % 40);
            assert_eq!(reader.io.reads, i + 1, "reads after frame {i}");
        }
    }

    #[tokio::test]
    async fn frames_split_across_reads_are_reassembled() {
        // One byte per read: every header and payload boundary falls inside a read.
        let (mut client, server) = tokio::io::duplex(1);
        let mut bytes = frame(TEXT, b"{\"type\":\"stop\"}");
        bytes.extend(frame(BINARY, &[5; 400]));
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            client.write_all(&bytes).await.unwrap();
        });
        let mut reader = FrameReader::new(server, 256, 1 << 20);
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::text("{\"type\":\"stop\"}")
        );
        assert_eq!(
            reader.next().await.unwrap().unwrap(),
            Message::binary(vec![5; 400])
        );
        // The client went away without a close.
        assert!(matches!(
            reader.next().await,
            Some(Err(Error::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
            )))
        ));
        assert!(reader.next().await.is_none());
    }

    async fn first_error(bytes: &[u8], max: usize) -> Error {
        let messages = read_all(bytes, 256, max).await;
        let last = messages.into_iter().last().expect("something read");
        last.expect_err("an error")
    }

    #[tokio::test]
    async fn protocol_violations_are_errors() {
        let mut unmasked = frame(TEXT, b"hi");
        unmasked[1] &= 0x7f;
        assert!(matches!(
            first_error(&unmasked, 1024).await,
            Error::Protocol(ProtocolError::UnmaskedFrameFromClient)
        ));
        assert!(matches!(
            first_error(&frame(TEXT | 0x40, b"hi"), 1024).await,
            Error::Protocol(ProtocolError::NonZeroReservedBits)
        ));
        assert!(matches!(
            first_error(&frame(0x80, b"hi"), 1024).await,
            Error::Protocol(ProtocolError::UnexpectedContinueFrame)
        ));
        let mut interrupted = frame(0x01, b"a");
        interrupted.extend(frame(TEXT, b"b"));
        assert!(matches!(
            first_error(&interrupted, 1024).await,
            Error::Protocol(ProtocolError::ExpectedFragment(Data::Text))
        ));
        assert!(matches!(
            first_error(&frame(0x09, b"x"), 1024).await,
            Error::Protocol(ProtocolError::FragmentedControlFrame)
        ));
        assert!(matches!(
            first_error(&frame(PING, &[0; 126]), 1024).await,
            Error::Protocol(ProtocolError::ControlFrameTooBig)
        ));
        assert!(matches!(
            first_error(&frame(0x83, b"x"), 1024).await,
            Error::Protocol(ProtocolError::UnknownDataFrameType(3))
        ));
        assert!(matches!(
            first_error(&frame(TEXT, &[0xff, 0xfe]), 1024).await,
            Error::Utf8(_)
        ));
        assert!(matches!(
            first_error(&frame(CLOSE, &[3]), 1024).await,
            Error::Protocol(ProtocolError::InvalidCloseSequence)
        ));
    }

    #[tokio::test]
    async fn oversized_frames_and_messages_are_refused() {
        // Refused from the header, before the payload is read.
        let header_only = &frame(BINARY, &[0; 2_000])[..8];
        assert!(matches!(
            first_error(header_only, 1_000).await,
            Error::Capacity(CapacityError::MessageTooLong {
                size: 2_000,
                max_size: 1_000
            })
        ));
        let mut fragments = frame(0x02, &[0; 600]);
        fragments.extend(frame(0x80, &[0; 600]));
        assert!(matches!(
            first_error(&fragments, 1_000).await,
            Error::Capacity(CapacityError::MessageTooLong {
                size: 1_200,
                max_size: 1_000
            })
        ));
    }

    #[test]
    fn unmasking_matches_the_bytewise_definition() {
        for len in 0..40 {
            let payload: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(31)).collect();
            let expected: Vec<u8> = payload
                .iter()
                .zip(MASK.iter().cycle())
                .map(|(b, m)| b ^ m)
                .collect();
            assert_eq!(unmasked(&payload, MASK), expected, "length {len}");
        }
    }
}
