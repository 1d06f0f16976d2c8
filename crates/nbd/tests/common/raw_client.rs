//! A hand-rolled NBD client speaking raw bytes, for protocol edge cases.

use super::*;

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

/// One complete reply to a request.
#[derive(Debug, Default)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success.
    pub error: u32,
    /// Read data reassembled (holes as zeros), for READ.
    pub data: Vec<u8>,
    /// (context id, extents) per block status chunk.
    pub extents: Vec<(u32, Vec<(u64, u64)>)>,
    /// Chunk types received, in order.
    pub chunk_types: Vec<u16>,
}

/// A hand-rolled NBD client for protocol edge cases.
pub struct RawClient {
    pub s: UnixStream,
    pub mode: HeaderMode,
    /// Lengths of READs awaiting a simple reply, by cookie.
    reads: HashMap<u64, (u64, u64)>,
}

impl RawClient {
    /// Connect and read the greeting; sends client flags (fixed newstyle, no zeroes).
    pub async fn connect(path: &Path) -> RawClient {
        let mut c = Self::connect_raw(path).await;
        let mut greet = [0u8; 18];
        c.s.read_exact(&mut greet).await.unwrap();
        assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
        c.s.write_all(&3u32.to_be_bytes()).await.unwrap();
        c
    }

    /// Connect without any handshake traffic.
    pub async fn connect_raw(path: &Path) -> RawClient {
        RawClient {
            s: UnixStream::connect(path).await.unwrap(),
            mode: HeaderMode::Simple,
            reads: HashMap::new(),
        }
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.s.write_all(&out).await.unwrap();
    }

    pub async fn read_option_reply(&mut self) -> io::Result<OptReply> {
        let mut hdr = [0u8; 20];
        self.s.read_exact(&mut hdr).await?;
        assert_eq!(
            u64::from_be_bytes(hdr[..8].try_into().unwrap()),
            proto::OPTION_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await?;
        Ok(OptReply {
            option: u32::from_be_bytes(hdr[8..12].try_into().unwrap()),
            reply: u32::from_be_bytes(hdr[12..16].try_into().unwrap()),
            data,
        })
    }

    /// Send an option and collect replies up to the final ACK or error.
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply().await.unwrap();
            let last = r.reply == proto::REP_ACK || r.reply & 0x8000_0000 != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub async fn structured(&mut self) {
        let r = self.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r[0].reply, proto::REP_ACK);
        self.mode = HeaderMode::Structured;
    }

    pub async fn extended(&mut self) {
        let r = self.option(proto::OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(r[0].reply, proto::REP_ACK);
        self.mode = HeaderMode::Extended;
    }

    /// LIST/SET_META_CONTEXT data.
    pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// SET_META_CONTEXT; returns (id, name) pairs.
    pub async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Vec<(u32, String)> {
        let replies = self
            .option(
                proto::OPT_SET_META_CONTEXT,
                &Self::meta_data(export, queries),
            )
            .await;
        assert_eq!(replies.last().unwrap().reply, proto::REP_ACK);
        replies
            .iter()
            .filter(|r| r.reply == proto::REP_META_CONTEXT)
            .map(|r| {
                let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
                (id, String::from_utf8(r.data[4..].to_vec()).unwrap())
            })
            .collect()
    }

    /// INFO/GO data.
    pub fn info_data(export: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// GO; returns (size, transmission flags). Panics unless it succeeds.
    pub async fn go(&mut self, export: &str) -> (u64, u16) {
        let replies = self
            .option(
                proto::OPT_GO,
                &Self::info_data(export, &[proto::INFO_BLOCK_SIZE]),
            )
            .await;
        assert_eq!(replies.last().unwrap().reply, proto::REP_ACK, "{replies:?}");
        let info = replies
            .iter()
            .find(|r| r.reply == proto::REP_INFO && r.data[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
        (size, flags)
    }

    /// Full setup: connect, structured replies, select all contexts, GO.
    pub async fn open(path: &Path, export: &str) -> RawClient {
        let mut c = Self::connect(path).await;
        c.structured().await;
        c.set_meta(export, &CONTEXTS).await;
        c.go(export).await;
        c
    }

    pub async fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let req = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        if command == proto::CMD_READ {
            self.reads.insert(cookie, (offset, length));
        }
        let mut out = proto::encode_request(self.mode, &req);
        out.extend_from_slice(payload);
        self.s.write_all(&out).await.unwrap();
    }

    /// Read one complete reply (all chunks up to DONE; assumes the server does not interleave).
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        let mut reply = Reply::default();
        loop {
            let magic = self.s.read_u32().await?;
            match magic {
                proto::SIMPLE_REPLY_MAGIC => {
                    reply.error = self.s.read_u32().await?;
                    reply.cookie = self.s.read_u64().await?;
                    if let Some((_, len)) = self.reads.remove(&reply.cookie) {
                        if reply.error == 0 {
                            reply.data = vec![0; len as usize];
                            self.s.read_exact(&mut reply.data).await?;
                        }
                    }
                    return Ok(reply);
                }
                proto::STRUCTURED_REPLY_MAGIC | proto::EXTENDED_REPLY_MAGIC => {
                    let flags = self.s.read_u16().await?;
                    let kind = self.s.read_u16().await?;
                    reply.cookie = self.s.read_u64().await?;
                    let len = if magic == proto::EXTENDED_REPLY_MAGIC {
                        let _offset = self.s.read_u64().await?;
                        self.s.read_u64().await?
                    } else {
                        u64::from(self.s.read_u32().await?)
                    };
                    let mut payload = vec![0u8; len as usize];
                    self.s.read_exact(&mut payload).await?;
                    reply.chunk_types.push(kind);
                    self.chunk(&mut reply, kind, &payload);
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        self.reads.remove(&reply.cookie);
                        return Ok(reply);
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }

    fn chunk(&self, reply: &mut Reply, kind: u16, p: &[u8]) {
        let be32 = |at: usize| u32::from_be_bytes(p[at..at + 4].try_into().unwrap());
        let be64 = |at: usize| u64::from_be_bytes(p[at..at + 8].try_into().unwrap());
        let (base, len) = self.reads.get(&reply.cookie).copied().unwrap_or((0, 0));
        if reply.data.len() as u64 != len {
            reply.data = vec![0; len as usize];
        }
        match kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                let at = (be64(0) - base) as usize;
                reply.data[at..at + p.len() - 8].copy_from_slice(&p[8..]);
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let at = (be64(0) - base) as usize;
                reply.data[at..at + be32(8) as usize].fill(0);
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                let ext = p[4..]
                    .chunks(8)
                    .map(|c| {
                        let l = u32::from_be_bytes(c[..4].try_into().unwrap());
                        let f = u32::from_be_bytes(c[4..].try_into().unwrap());
                        (u64::from(l), u64::from(f))
                    })
                    .collect();
                reply.extents.push((be32(0), ext));
            }
            proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
                let count = be32(4) as usize;
                let ext: Vec<(u64, u64)> = p[8..]
                    .chunks(16)
                    .map(|c| {
                        (
                            u64::from_be_bytes(c[..8].try_into().unwrap()),
                            u64::from_be_bytes(c[8..].try_into().unwrap()),
                        )
                    })
                    .collect();
                assert_eq!(ext.len(), count);
                reply.extents.push((be32(0), ext));
            }
            proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => reply.error = be32(0),
            proto::REPLY_TYPE_NONE => {}
            other => panic!("unexpected chunk type {other}"),
        }
    }

    /// Send one request and wait for its reply.
    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Reply {
        self.send_request(command, flags, 1, offset, length, payload)
            .await;
        self.read_reply().await.unwrap()
    }

    /// Whether the server has closed the connection (EOF or reset within `wait`).
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, self.s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
