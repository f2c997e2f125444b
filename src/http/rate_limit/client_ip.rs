//! Who the client is, by address: the TCP peer, unless the peer is a trusted proxy, in which case
//! the right-most address of `X-Forwarded-For` that is not itself a trusted proxy.

use std::net::{IpAddr, SocketAddr};

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;

use super::settings::TrustedNet;

const FORWARDED_FOR: &str = "x-forwarded-for";

/// The networks whose `X-Forwarded-For` is believed.
#[derive(Debug, Default, Clone)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: &[TrustedNet]) -> Self {
        Self(nets.iter().map(|n| n.0).collect())
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address, or `None` when the peer is unknown.
    pub fn client_ip(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = canonical(peer?.ip());
        if self.0.is_empty() || !self.trusts(peer) {
            return Some(peer);
        }
        // why: each proxy appends the address it received the request from, so the entries
        // right of the last untrusted one were written by our proxies and are true; anything
        // left of it was written by the client and may be forged.
        let mut client = peer;
        let hops = headers
            .get_all(FORWARDED_FOR)
            .rev()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|line| line.rsplit(','));
        for hop in hops {
            let Some(ip) = parse_hop(hop) else {
                // A hop our proxy did not write; the last believable address is the client.
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        Some(client)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are the IPv4 client they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(lines: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in lines {
            map.append(
                HeaderName::from_static(FORWARDED_FOR),
                HeaderValue::from_static(line),
            );
        }
        map
    }

    fn proxies(nets: &[&str]) -> Result<TrustedProxies, String> {
        let nets: Result<Vec<TrustedNet>, String> = nets.iter().map(|n| n.parse()).collect();
        Ok(TrustedProxies::new(&nets?))
    }

    #[test]
    fn the_client_address_follows_only_trusted_proxies() -> anyhow::Result<()> {
        let trusted = proxies(&["10.0.0.0/8", "192.0.2.7"]).map_err(anyhow::Error::msg)?;
        let proxy: SocketAddr = "10.1.2.3:5000".parse()?;
        let stranger: SocketAddr = "203.0.113.9:5000".parse()?;
        let cases: [(&str, SocketAddr, &[&'static str], &str); 9] = [
            ("no proxy: the peer", stranger, &[], "203.0.113.9"),
            (
                "an untrusted peer's header is ignored",
                stranger,
                &["1.1.1.1"],
                "203.0.113.9",
            ),
            ("trusted peer without a header: the peer", proxy, &[], "10.1.2.3"),
            ("one hop", proxy, &["198.51.100.1"], "198.51.100.1"),
            (
                "forged left entries are skipped",
                proxy,
                &["6.6.6.6, 198.51.100.1"],
                "198.51.100.1",
            ),
            (
                "trusted hops are walked past",
                proxy,
                &["198.51.100.1, 192.0.2.7, 10.9.9.9"],
                "198.51.100.1",
            ),
            (
                "several header lines read as one list",
                proxy,
                &["6.6.6.6", "198.51.100.1, 10.0.0.1"],
                "198.51.100.1",
            ),
            ("ports are dropped", proxy, &["198.51.100.1:4711"], "198.51.100.1"),
            (
                "garbage stops the walk at the last good hop",
                proxy,
                &["198.51.100.1, junk, 10.0.0.2"],
                "10.0.0.2",
            ),
        ];
        for (what, peer, lines, expected) in cases {
            let got = trusted.client_ip(Some(peer), &headers(lines));
            assert_eq!(got, Some(expected.parse()?), "{what}");
        }
        Ok(())
    }

    #[test]
    fn ipv4_mapped_peers_are_their_ipv4_address() -> anyhow::Result<()> {
        let peer: SocketAddr = "[::ffff:198.51.100.1]:80".parse()?;
        let got = TrustedProxies::default().client_ip(Some(peer), &HeaderMap::new());
        assert_eq!(got, Some("198.51.100.1".parse()?));
        Ok(())
    }
}
