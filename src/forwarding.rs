//! Who the client is, network-wise: the peer address, and the client address behind trusted
//! proxies. Frappe uses `X-Forwarded-For` for login lockouts and `@rate_limit`, so a client must
//! not be able to choose it: the header is believed only from configured proxies.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

use crate::frappe::headers::X_FORWARDED_FOR;

/// The TCP peer of the connection a request came on (a request extension set by the server).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Marks a request that arrived over TLS (a request extension set by the server).
#[derive(Debug, Clone, Copy)]
pub struct ArrivedOverTls;

/// Peers whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts these ranges.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// True if `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
    /// `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let entries = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        entries
            .into_iter()
            .rev()
            .find(|ip| !self.contains(*ip))
            .unwrap_or(peer)
    }

    /// The block (see [`source_block`]) of the client that sent `request`, as per-source bounds
    /// count it; a request without a [`PeerAddr`] counts as from the unspecified address.
    pub fn source_of<B>(&self, request: &http::Request<B>) -> IpAddr {
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
        source_block(self.client_ip(peer, request.headers()))
    }
}

/// The block one source is limited as: an IPv4 address, or an IPv6 /64 (one host's share; a
/// host rotating through its /64 is still one source). IPv4-mapped IPv6 is its IPv4 address.
pub fn source_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4, 203.0.113.9, 10.0.0.2"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(
            trusted.client_ip(proxy, &h),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(trusted.client_ip(stranger, &h), stranger);
        assert_eq!(trusted.client_ip(proxy, &HeaderMap::new()), proxy);
    }
}
