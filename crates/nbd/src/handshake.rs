//! Fixed newstyle negotiation: greeting, client flags, then options until the client picks an
//! export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Each option's data is read whole (bounded by [`MAX_OPTION_DATA`]) and parsed into a typed
//! [`Opt`] before anything is answered; malformed data gets `NBD_REP_ERR_INVALID` and the
//! negotiation goes on. Only a broken frame (bad magic, absurd length, unknown client flags)
//! or a failed `NBD_OPT_EXPORT_NAME` closes the connection.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::meta::{match_contexts, QueryMode};
use crate::proto::{self, Cursor, HeaderMode};
use crate::registry::{Export, Lease, PeerProbe, Registry};

/// Longest option data read into memory; longer known options get `NBD_REP_ERR_TOO_BIG`.
const MAX_OPTION_DATA: u32 = 256 * 1024;

/// What a finished handshake hands to the transmission phase.
pub(crate) struct Session {
    /// Keeps the export's client count while the connection (and its requests) live.
    pub(crate) lease: Lease,
    /// Header style for requests and replies.
    pub(crate) mode: HeaderMode,
    /// Export size announced to the client; requests are checked against it.
    pub(crate) size: u64,
    /// Selected metadata contexts (indices into the backend's list; the index is the id).
    pub(crate) contexts: Vec<usize>,
}

impl Session {
    /// The export served.
    pub(crate) fn export(&self) -> &Arc<Export> {
        self.lease.export()
    }
}

/// How negotiation ended.
pub(crate) enum Outcome {
    /// The client entered transmission.
    Transmission(Session),
    /// The client aborted (`NBD_OPT_ABORT`).
    Aborted,
}

/// Transmission flags for an export, as QSD advertises them.
pub(crate) fn transmission_flags(export: &Export, mode: HeaderMode, multi_conn: bool) -> u16 {
    let mut flags = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_CACHE;
    if multi_conn {
        flags |= proto::TFLAG_CAN_MULTI_CONN;
    }
    if export.cfg.writable {
        flags |=
            proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES | proto::TFLAG_SEND_FAST_ZERO;
    } else {
        flags |= proto::TFLAG_READ_ONLY;
    }
    if mode >= HeaderMode::Structured {
        flags |= proto::TFLAG_SEND_DF;
    }
    flags
}

/// A parsed option.
enum Opt<'a> {
    List,
    Abort,
    StartTls,
    Info {
        go: bool,
        name: &'a [u8],
        want_name: bool,
        want_block_size: bool,
    },
    StructuredReply,
    ExtendedHeaders,
    MetaContext {
        mode: QueryMode,
        name: &'a [u8],
        queries: Vec<&'a [u8]>,
    },
}

/// Why an option was refused: reply type and message.
type Refusal = (u32, String);

fn invalid(msg: impl Into<String>) -> Refusal {
    (proto::REP_ERR_INVALID, msg.into())
}

fn option_name(option: u32) -> &'static str {
    match option {
        proto::OPT_EXPORT_NAME => "export name",
        proto::OPT_ABORT => "abort",
        proto::OPT_LIST => "list",
        4 => "peek export",
        proto::OPT_STARTTLS => "starttls",
        proto::OPT_INFO => "info",
        proto::OPT_GO => "go",
        proto::OPT_STRUCTURED_REPLY => "structured reply",
        proto::OPT_LIST_META_CONTEXT => "list meta context",
        proto::OPT_SET_META_CONTEXT => "set meta context",
        proto::OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// Parse the data of a known option. Lengths that disagree give `NBD_REP_ERR_INVALID`.
fn parse_option(option: u32, data: &[u8]) -> Result<Opt<'_>, Refusal> {
    let inconsistent = || {
        invalid(format!(
            "Inconsistent lengths in option {}",
            option_name(option)
        ))
    };
    let no_data = |opt: Opt<'static>| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(invalid(format!(
                "option '{}' has unexpected length",
                option_name(option)
            )))
        }
    };
    match option {
        proto::OPT_LIST => no_data(Opt::List),
        // The spec asks servers to ignore any data sent with ABORT.
        proto::OPT_ABORT => Ok(Opt::Abort),
        proto::OPT_STARTTLS => no_data(Opt::StartTls),
        proto::OPT_STRUCTURED_REPLY => no_data(Opt::StructuredReply),
        proto::OPT_EXTENDED_HEADERS => no_data(Opt::ExtendedHeaders),
        proto::OPT_INFO | proto::OPT_GO => {
            let mut c = Cursor::new(data);
            let name = read_name(&mut c).map_err(|r| r.unwrap_or_else(inconsistent))?;
            let count = c.u16().ok_or_else(inconsistent)?;
            let (mut want_name, mut want_block_size) = (false, false);
            for _ in 0..count {
                match c.u16().ok_or_else(inconsistent)? {
                    proto::INFO_NAME => want_name = true,
                    proto::INFO_BLOCK_SIZE => want_block_size = true,
                    _ => {}
                }
            }
            if c.remaining() != 0 {
                return Err(invalid(format!(
                    "option '{}' has unexpected length",
                    option_name(option)
                )));
            }
            Ok(Opt::Info {
                go: option == proto::OPT_GO,
                name,
                want_name,
                want_block_size,
            })
        }
        proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
            let mut c = Cursor::new(data);
            let name = read_name(&mut c).map_err(|r| r.unwrap_or_else(inconsistent))?;
            let count = c.u32().ok_or_else(inconsistent)?;
            // Each query takes at least 4 bytes: a count beyond that is a lie, not a big request.
            if count as usize > c.remaining() / 4 {
                return Err(inconsistent());
            }
            let mut queries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let len = c.u32().ok_or_else(inconsistent)?;
                let query = c.take(len as usize).ok_or_else(inconsistent)?;
                // Over-long queries cannot name any context: skip them, as QEMU does.
                if query.len() <= proto::MAX_STRING {
                    queries.push(query);
                }
            }
            if c.remaining() != 0 {
                return Err(inconsistent());
            }
            let mode = if option == proto::OPT_LIST_META_CONTEXT {
                QueryMode::List
            } else {
                QueryMode::Set
            };
            Ok(Opt::MetaContext {
                mode,
                name,
                queries,
            })
        }
        _ => Err((
            proto::REP_ERR_UNSUP,
            format!("Unsupported option {option} ({})", option_name(option)),
        )),
    }
}

/// Read a length-prefixed export name. `Err(None)`: truncated data; `Err(Some)`: too long.
fn read_name<'a>(c: &mut Cursor<'a>) -> Result<&'a [u8], Option<Refusal>> {
    let len = c.u32().ok_or(None)?;
    if len as usize > proto::MAX_STRING {
        return Err(Some(invalid(format!("Invalid name length: {len}"))));
    }
    c.take(len as usize).ok_or(None)
}

/// Negotiation state that options change.
struct State<'r> {
    registry: &'r Registry,
    /// The connection's socket, for the lease (safe-mode removal asks it).
    peer: &'r Arc<PeerProbe>,
    multi_conn: bool,
    mode: HeaderMode,
    /// The last `NBD_OPT_SET_META_CONTEXT`: which export, which contexts.
    meta: Option<(Arc<Export>, Vec<usize>)>,
}

/// Run the handshake on a fresh connection.
pub(crate) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    registry: &Registry,
    peer: &Arc<PeerProbe>,
    multi_conn: bool,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&proto::greeting()).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let fixed = client_flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut st = State {
        registry,
        peer,
        multi_conn,
        mode: HeaderMode::Simple,
        meta: None,
    };
    loop {
        let mut hdr = [0u8; 16];
        r.read_exact(&mut hdr).await?;
        let hdr = proto::decode_option_header(&hdr);
        if hdr.magic != proto::IHAVEOPT {
            return Err(protocol(format!("bad option magic {:#x}", hdr.magic)));
        }
        if hdr.length > proto::MAX_PAYLOAD {
            return Err(protocol(format!("option length {} too large", hdr.length)));
        }
        if hdr.option == proto::OPT_EXPORT_NAME {
            let session = export_name(r, w, &st, hdr.length, no_zeroes).await?;
            return Ok(Outcome::Transmission(session));
        }
        if !fixed {
            return Err(protocol(format!(
                "option {} without fixed newstyle",
                hdr.option
            )));
        }
        let known_option = matches!(hdr.option, 2..=3 | 5..=11);
        if !known_option || hdr.length > MAX_OPTION_DATA {
            drain(r, u64::from(hdr.length)).await?;
            let (reply, msg) = if known_option {
                (
                    proto::REP_ERR_TOO_BIG,
                    format!("option '{}' too big", option_name(hdr.option)),
                )
            } else {
                (
                    proto::REP_ERR_UNSUP,
                    format!(
                        "Unsupported option {} ({})",
                        hdr.option,
                        option_name(hdr.option)
                    ),
                )
            };
            send(w, hdr.option, &[(reply, msg.into_bytes())]).await?;
            continue;
        }
        let mut data = vec![0u8; hdr.length as usize];
        r.read_exact(&mut data).await?;
        let opt = match parse_option(hdr.option, &data) {
            Ok(opt) => opt,
            Err((reply, msg)) => {
                if hdr.option == proto::OPT_SET_META_CONTEXT {
                    // A failed SET still replaces the earlier selection.
                    st.meta = None;
                }
                send(w, hdr.option, &[(reply, msg.into_bytes())]).await?;
                continue;
            }
        };
        if let Opt::Abort = opt {
            // The client may already be gone; the ACK is a courtesy.
            let _ = send(w, hdr.option, &[(proto::REP_ACK, Vec::new())]).await;
            return Ok(Outcome::Aborted);
        }
        let (replies, session) = answer(&mut st, opt);
        send(w, hdr.option, &replies).await?;
        if let Some(session) = session {
            return Ok(Outcome::Transmission(session));
        }
    }
}

/// Answer one option (other than ABORT and EXPORT_NAME): the replies to send, and the session
/// if the option was a successful GO.
fn answer(st: &mut State<'_>, opt: Opt<'_>) -> (Vec<(u32, Vec<u8>)>, Option<Session>) {
    let err = |reply: u32, msg: String| (vec![(reply, msg.into_bytes())], None);
    match opt {
        Opt::List => {
            let mut replies: Vec<(u32, Vec<u8>)> = st
                .registry
                .all()
                .iter()
                .map(|e| {
                    let desc = e.cfg.description.as_deref().unwrap_or("");
                    (
                        proto::REP_SERVER,
                        proto::rep_server(e.cfg.name.as_bytes(), desc.as_bytes()),
                    )
                })
                .collect();
            replies.push((proto::REP_ACK, Vec::new()));
            (replies, None)
        }
        Opt::Abort => (vec![(proto::REP_ACK, Vec::new())], None),
        Opt::StartTls => err(proto::REP_ERR_POLICY, "TLS not configured".into()),
        Opt::StructuredReply => match st.mode {
            HeaderMode::Extended => err(
                proto::REP_ERR_EXT_HEADER_REQD,
                "extended headers already negotiated".into(),
            ),
            HeaderMode::Structured => err(
                proto::REP_ERR_INVALID,
                "structured reply already negotiated".into(),
            ),
            HeaderMode::Simple => {
                st.mode = HeaderMode::Structured;
                (vec![(proto::REP_ACK, Vec::new())], None)
            }
        },
        Opt::ExtendedHeaders => {
            if st.mode == HeaderMode::Extended {
                err(
                    proto::REP_ERR_INVALID,
                    "extended headers already negotiated".into(),
                )
            } else {
                st.mode = HeaderMode::Extended;
                (vec![(proto::REP_ACK, Vec::new())], None)
            }
        }
        Opt::Info {
            go,
            name,
            want_name,
            want_block_size,
        } => info(st, go, name, want_name, want_block_size),
        Opt::MetaContext {
            mode,
            name,
            queries,
        } => {
            if mode == QueryMode::Set {
                st.meta = None;
                if st.mode < HeaderMode::Structured {
                    return err(
                        proto::REP_ERR_INVALID,
                        "request option 'set meta context' when structured reply is not negotiated"
                            .into(),
                    );
                }
            }
            let Some(export) = st.registry.find(name) else {
                return err(proto::REP_ERR_UNKNOWN, not_present(name));
            };
            let available = export.cfg.backend.meta_contexts();
            let picked = match_contexts(&available, &queries, mode);
            let mut replies: Vec<(u32, Vec<u8>)> = picked
                .iter()
                .filter_map(|&i| {
                    let id = if mode == QueryMode::Set {
                        u32::try_from(i).ok()?
                    } else {
                        0
                    };
                    Some((
                        proto::REP_META_CONTEXT,
                        proto::rep_meta_context(id, available[i].as_bytes()),
                    ))
                })
                .collect();
            replies.push((proto::REP_ACK, Vec::new()));
            if mode == QueryMode::Set {
                st.meta = Some((export, picked));
            }
            (replies, None)
        }
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`.
fn info(
    st: &mut State<'_>,
    go: bool,
    name: &[u8],
    want_name: bool,
    want_block_size: bool,
) -> (Vec<(u32, Vec<u8>)>, Option<Session>) {
    // GO takes its lease before answering, so a removal racing with it either hides the
    // export (ERR_UNKNOWN) or finds this client counted.
    let (export, lease) = if go {
        match st.registry.lease(name, st.peer) {
            Some(l) => (l.export().clone(), Some(l)),
            None => {
                return (
                    vec![(proto::REP_ERR_UNKNOWN, not_present(name).into_bytes())],
                    None,
                )
            }
        }
    } else {
        match st.registry.find(name) {
            Some(e) => (e, None),
            None => {
                return (
                    vec![(proto::REP_ERR_UNKNOWN, not_present(name).into_bytes())],
                    None,
                )
            }
        }
    };
    let cfg = &export.cfg;
    let mut replies = Vec::new();
    if want_name {
        replies.push((proto::REP_INFO, proto::info_string(proto::INFO_NAME, name)));
    }
    if let Some(desc) = &cfg.description {
        replies.push((
            proto::REP_INFO,
            proto::info_string(proto::INFO_DESCRIPTION, desc.as_bytes()),
        ));
    }
    // Like QEMU: the real minimum only to clients that promise to honour it (or just look).
    let min = if !go || want_block_size {
        cfg.min_block
    } else {
        1
    };
    let preferred = min.max(4096);
    replies.push((
        proto::REP_INFO,
        proto::info_block_size(min, preferred, proto::MAX_PAYLOAD),
    ));
    let size = cfg.backend.size();
    let flags = transmission_flags(&export, st.mode, st.multi_conn);
    replies.push((proto::REP_INFO, proto::info_export(size, flags)));
    if !go && !want_block_size && cfg.min_block > 1 {
        replies.push((
            proto::REP_ERR_BLOCK_SIZE_REQD,
            b"request NBD_INFO_BLOCK_SIZE to use this export".to_vec(),
        ));
        return (replies, None);
    }
    replies.push((proto::REP_ACK, Vec::new()));
    let session = lease.map(|lease| Session {
        contexts: selected_for(&st.meta, &export),
        lease,
        mode: st.mode,
        size,
    });
    (replies, session)
}

/// Contexts chosen by the last SET_META_CONTEXT, if it named the export being entered.
fn selected_for(meta: &Option<(Arc<Export>, Vec<usize>)>, export: &Arc<Export>) -> Vec<usize> {
    match meta {
        Some((e, ids)) if Arc::ptr_eq(e, export) => ids.clone(),
        _ => Vec::new(),
    }
}

/// `NBD_OPT_EXPORT_NAME`: no way to report errors, so every failure closes the connection.
async fn export_name<R, W>(
    r: &mut R,
    w: &mut W,
    st: &State<'_>,
    length: u32,
    no_zeroes: bool,
) -> io::Result<Session>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if length as usize > proto::MAX_STRING {
        return Err(protocol("export name too long".into()));
    }
    let mut name = vec![0u8; length as usize];
    r.read_exact(&mut name).await?;
    if st.mode == HeaderMode::Extended {
        return Err(protocol(
            "NBD_OPT_EXPORT_NAME after extended headers".into(),
        ));
    }
    let Some(lease) = st.registry.lease(&name, st.peer) else {
        return Err(protocol(not_present(&name)));
    };
    let export = lease.export().clone();
    let size = export.cfg.backend.size();
    let flags = transmission_flags(&export, st.mode, st.multi_conn);
    w.write_all(&proto::export_name_reply(size, flags, no_zeroes))
        .await?;
    w.flush().await?;
    Ok(Session {
        contexts: selected_for(&st.meta, &export),
        lease,
        mode: st.mode,
        size,
    })
}

fn not_present(name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    let shown: String = name.chars().take(80).collect();
    let dots = if shown.len() < name.len() { "..." } else { "" };
    format!("export '{shown}{dots}' not present")
}

/// Send the replies to one option in a single write.
async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    replies: &[(u32, Vec<u8>)],
) -> io::Result<()> {
    let mut out = Vec::new();
    for (reply, data) in replies {
        proto::put_option_reply(&mut out, option, *reply, data);
    }
    w.write_all(&out).await?;
    w.flush().await
}

/// Read and discard `len` bytes.
pub(crate) async fn drain<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_data_parses_name_and_requested_infos() {
        let data = info_data(b"disk", &[proto::INFO_BLOCK_SIZE, 77]);
        match parse_option(proto::OPT_GO, &data) {
            Ok(Opt::Info {
                go,
                name,
                want_name,
                want_block_size,
            }) => {
                assert!(go && want_block_size && !want_name);
                assert_eq!(name, b"disk");
            }
            _ => panic!("GO data not parsed"),
        }
    }

    #[test]
    fn go_data_with_trailing_bytes_is_invalid() {
        let mut data = info_data(b"disk", &[]);
        data.push(0);
        assert!(matches!(
            parse_option(proto::OPT_GO, &data),
            Err((proto::REP_ERR_INVALID, _))
        ));
    }

    #[test]
    fn meta_query_count_beyond_the_data_is_invalid() {
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"disk");
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        let res = parse_option(proto::OPT_LIST_META_CONTEXT, &data);
        assert!(matches!(res, Err((proto::REP_ERR_INVALID, _))));
    }

    #[test]
    fn over_long_name_is_invalid_not_truncated() {
        let data = info_data(&[b'a'; 5000], &[]);
        match parse_option(proto::OPT_INFO, &data) {
            Err((reply, msg)) => {
                assert_eq!(reply, proto::REP_ERR_INVALID);
                assert_eq!(msg, "Invalid name length: 5000");
            }
            Ok(_) => panic!("accepted a 5000-byte name"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_option_data_parses_or_is_refused_without_panic(
            option in 0u32..16,
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = parse_option(option, &data);
        }

        #[test]
        fn well_formed_meta_data_round_trips(
            name in "[a-z]{0,12}",
            queries in proptest::collection::vec("[a-z:]{0,20}", 0..6),
        ) {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in &queries {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            match parse_option(proto::OPT_SET_META_CONTEXT, &d) {
                Ok(Opt::MetaContext { mode, name: n, queries: qs }) => {
                    prop_assert_eq!(mode, QueryMode::Set);
                    prop_assert_eq!(n, name.as_bytes());
                    let want: Vec<&[u8]> = queries.iter().map(|q| q.as_bytes()).collect();
                    prop_assert_eq!(qs, want);
                }
                _ => prop_assert!(false, "not parsed"),
            }
        }
    }
}
