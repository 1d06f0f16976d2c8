//! Socket addresses (`sockets.json`).

use serde::{Deserialize, Serialize};

/// `InetSocketAddressBase`: host and port only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InetSocketAddressBase {
    /// Host name or address.
    pub host: String,
    /// Port number or service name.
    pub port: String,
}

/// `InetSocketAddress`: a TCP address with options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InetSocketAddress {
    /// Host name or address.
    pub host: String,
    /// Port number or service name.
    pub port: String,
    /// Host and port are numeric (no name lookup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<bool>,
    /// Try ports up to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u16>,
    /// Use IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    /// Use IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// Enable TCP keep-alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<bool>,
    /// Use multipath TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mptcp: Option<bool>,
}

/// `UnixSocketAddress`: a UNIX domain socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct UnixSocketAddress {
    /// Socket path.
    pub path: String,
    /// Linux abstract namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#abstract: Option<bool>,
    /// Abstract address length without padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tight: Option<bool>,
}

/// `VsockSocketAddress`: a vsock address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VsockSocketAddress {
    /// Context id.
    pub cid: String,
    /// Port.
    pub port: String,
}

/// `FdSocketAddress`: a file descriptor passed by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FdSocketAddress {
    /// Name or number of the descriptor.
    pub str: String,
}

/// `SocketAddress`: flat union on `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SocketAddress {
    /// TCP.
    Inet(InetSocketAddress),
    /// UNIX domain socket.
    Unix(UnixSocketAddress),
    /// vsock.
    Vsock(VsockSocketAddress),
    /// Pre-opened descriptor.
    Fd(FdSocketAddress),
}

/// `SocketAddressLegacy`: the older shape `{"type": .., "data": {..}}` (`nbd-server-start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum SocketAddressLegacy {
    /// TCP.
    Inet(InetSocketAddress),
    /// UNIX domain socket.
    Unix(UnixSocketAddress),
    /// vsock.
    Vsock(VsockSocketAddress),
    /// Pre-opened descriptor.
    Fd(FdSocketAddress),
}

impl From<SocketAddressLegacy> for SocketAddress {
    fn from(a: SocketAddressLegacy) -> Self {
        match a {
            SocketAddressLegacy::Inet(x) => SocketAddress::Inet(x),
            SocketAddressLegacy::Unix(x) => SocketAddress::Unix(x),
            SocketAddressLegacy::Vsock(x) => SocketAddress::Vsock(x),
            SocketAddressLegacy::Fd(x) => SocketAddress::Fd(x),
        }
    }
}
