//! The command line: QSD's options (in order, repeatable) plus a short form for people.
//!
//! QSD-compatible: `--chardev socket,id=ID,path=PATH,server=on,wait=off`, `--monitor [chardev=]ID`,
//! `--blockdev KEYVAL|JSON`, `--nbd-server KEYVAL`, `--export KEYVAL`, `--pidfile PATH`,
//! `--daemonize`, `--help`, `--version`. Both `--opt value` and `--opt=value` work.
//!
//! Short form: `blockd --image PATH [--qmp SOCKET] [--nbd SOCKET]` opens PATH (format probed) as device
//! `drive0` and serves QMP on SOCKET (default [`default_qmp_socket`]).

/// One option, in command-line order.
#[derive(Debug, Clone, PartialEq)]
pub enum Opt {
    /// `--chardev` keyval text.
    Chardev(String),
    /// `--monitor` keyval text.
    Monitor(String),
    /// `--blockdev` keyval or JSON text.
    Blockdev(String),
    /// `--nbd-server` keyval text.
    NbdServer(String),
    /// `--export` keyval text.
    Export(String),
    /// `--pidfile PATH`.
    Pidfile(String),
    /// `--daemonize`.
    Daemonize,
    /// `--image PATH` (short form): device drive0 over PATH.
    Image(String),
    /// `--create SIZE` (short form): create `--image` as a qcow2 of SIZE when it is missing.
    Create(String),
    /// `--qmp PATH` (short form): a QMP monitor socket.
    Qmp(String),
    /// `--nbd PATH` (short form): an NBD server on a Unix socket exporting every short-form device.
    Nbd(String),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Run the daemon with these options.
    Run(Vec<Opt>),
    /// Print help.
    Help,
    /// Print the version.
    Version,
}

/// Help text.
pub const HELP: &str = "\
Usage: blockd [options]
A QMP block daemon compatible with qemu-storage-daemon, centred on incremental backup.

QSD-compatible options (repeatable, applied in order):
  --chardev socket,id=<id>,path=<path>,server=on,wait=off
                         a Unix socket (or host=<h>,port=<p> for TCP) for a monitor
  --monitor [chardev=]<id>
                         serve QMP on that chardev
  --blockdev <keyval>|<json>
                         add a block node, e.g. driver=file,node-name=f0,filename=disk.img
  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
                         start the NBD server
  --export type=nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on][,bitmaps.0=<bitmap>]
                         export a node over NBD
  --pidfile <path>       write the daemon's pid there (removed at exit)
  --daemonize            detach once everything is set up
  -h, --help             this text
  -V, --version          the version

Short form:
  --image <path>         open <path> (qcow2 or raw, probed) as device 'drive0'
  --create <size>        with --image: first create <path> as a qcow2 image of <size>
                         (e.g. 1G) if it does not exist; an existing file is never touched
  --qmp <path>           QMP socket for the short form (default: $XDG_RUNTIME_DIR/blockd.sock,
                         else /tmp/blockd-<uid>.sock)
  --nbd <path>           NBD server on a Unix socket exporting 'drive0' writable

Logs: quiet by default; RUST_LOG=blockd=debug (or info, trace) raises them.
";

/// Parse argv (without the program name).
pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut opts = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let takes_value = !matches!(
            name.as_str(),
            "--daemonize" | "-h" | "--help" | "-V" | "--version"
        );
        let value = if takes_value {
            match inline {
                Some(v) => Some(v),
                None => {
                    i += 1;
                    Some(
                        args.get(i)
                            .cloned()
                            .ok_or_else(|| format!("option '{name}' requires an argument"))?,
                    )
                }
            }
        } else {
            if inline.is_some() {
                return Err(format!("option '{name}' doesn't allow an argument"));
            }
            None
        };
        let v = value.unwrap_or_default();
        opts.push(match name.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--chardev" => Opt::Chardev(v),
            "--monitor" => Opt::Monitor(v),
            "--blockdev" => Opt::Blockdev(v),
            "--nbd-server" => Opt::NbdServer(v),
            "--export" => Opt::Export(v),
            "--pidfile" => Opt::Pidfile(v),
            "--daemonize" => Opt::Daemonize,
            "--image" | "-i" => Opt::Image(v),
            "--create" => Opt::Create(v),
            "--qmp" => Opt::Qmp(v),
            "--nbd" => Opt::Nbd(v),
            other if other.starts_with('-') => {
                return Err(format!("unrecognized option '{other}'"))
            }
            other => return Err(format!("Unexpected argument: {other}")),
        });
        i += 1;
    }
    Ok(Parsed::Run(opts))
}

/// Where the short form puts its QMP socket when `--qmp` is not given.
pub fn default_qmp_socket() -> String {
    match std::env::var("XDG_RUNTIME_DIR") {
        Ok(dir) if !dir.is_empty() => format!("{dir}/blockd.sock"),
        _ => format!("/tmp/blockd-{}.sock", nix::unistd::getuid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options_keep_their_order() {
        let p = parse(&args(&[
            "--blockdev",
            "driver=null-co,node-name=a",
            "--chardev=socket,id=m",
            "--monitor",
            "m",
        ]));
        assert_eq!(
            p,
            Ok(Parsed::Run(vec![
                Opt::Blockdev("driver=null-co,node-name=a".into()),
                Opt::Chardev("socket,id=m".into()),
                Opt::Monitor("m".into())
            ]))
        );
    }

    #[test]
    fn unknown_option_is_an_error() {
        assert!(parse(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn missing_value_is_an_error() {
        assert!(parse(&args(&["--blockdev"])).is_err());
    }
}
