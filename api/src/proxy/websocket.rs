//! A proxied WebSocket: the two TCP streams spliced byte for byte (nothing is
//! re-framed), and the client's frames watched only to tell its messages from
//! pings, pongs and closes: a message is activity, a ping is not.

use axum::body::Bytes;
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// What one read may take; allocated only while data flows, so an idle
/// WebSocket holds no buffer.
const CHUNK: usize = 16 * 1024;

/// Follows the frames a client sends (RFC 6455 §5.2) across reads of any size.
#[derive(Debug, Default)]
pub struct FrameWatch {
    /// The header read so far (at most 14 bytes).
    header: [u8; 14],
    have: usize,
    /// Payload bytes still to pass before the next header.
    payload_left: u64,
}

impl FrameWatch {
    /// Takes the next bytes the client sent; true when they began a data frame
    /// (text, binary or a continuation): a message, not a control frame.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut message = false;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() as u64) as usize;
                self.payload_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (self.needed() - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have < self.needed() {
                continue;
            }
            let opcode = self.header[0] & 0x0f;
            message |= matches!(opcode, 0x0..=0x2);
            self.payload_left = self.length();
            self.have = 0;
        }
        message
    }

    /// The header's length, as far as the bytes so far tell.
    fn needed(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn length(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("eight bytes")),
            short => u64::from(short),
        }
    }
}

/// Splices a client's and a server's streams until either ends; `from_client` and
/// `from_server` are bytes each side sent that were read along with the upgrade.
/// `message` is called for each read of the client's that began a message.
pub async fn splice(
    client: TcpStream,
    from_client: Bytes,
    server: TcpStream,
    from_server: Bytes,
    message: impl Fn() + Send + Sync,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut watch = FrameWatch::default();
    let up = pump(client_read, server_write, from_client, |bytes| {
        if watch.feed(bytes) {
            message();
        }
    });
    let down = pump(server_read, client_write, from_server, |_| {});
    // A WebSocket is over when either side has gone: the other is closed too.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    first: Bytes,
    mut seen: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    if !first.is_empty() {
        seen(&first);
        to.write_all(&first).await?;
    }
    // A slice of the handshake's read buffer: holding it would keep that buffer
    // (kilobytes) for as long as the WebSocket lives.
    drop(first);
    loop {
        from.readable().await?;
        let mut buffer = vec![0; CHUNK];
        loop {
            match from.try_read(&mut buffer) {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                Ok(n) => {
                    seen(&buffer[..n]);
                    to.write_all(&buffer[..n]).await?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame with `opcode` and `len` payload bytes.
    fn frame(opcode: u8, len: usize) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match len {
            0..=125 => out.push(0x80 | len as u8),
            126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend(std::iter::repeat_n(0x61, len));
        out
    }

    #[test]
    fn messages_count_and_control_frames_do_not() {
        let mut watch = FrameWatch::default();
        assert!(!watch.feed(&frame(0x9, 4)), "a ping");
        assert!(!watch.feed(&frame(0xA, 0)), "a pong");
        assert!(watch.feed(&frame(0x1, 12)), "a text message");
        assert!(watch.feed(&frame(0x2, 70_000)), "a long binary message");
        assert!(!watch.feed(&frame(0x8, 2)), "a close");
    }

    #[test]
    fn frames_split_anywhere_across_reads_are_followed() {
        let mut stream = frame(0x9, 3);
        stream.extend(frame(0xA, 200));
        stream.extend(frame(0x1, 300));
        stream.extend(frame(0x9, 0));
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let mut watch = FrameWatch::default();
            let messages = stream.chunks(chunk).filter(|c| watch.feed(c)).count();
            assert_eq!(
                messages, 1,
                "reads of {chunk} bytes see the one message once"
            );
            assert_eq!(watch.have, 0, "and end between frames");
            assert_eq!(watch.payload_left, 0);
        }
    }
}
