//! Answers for names the cluster owns, computed from one [`Snapshot`].
//! Pure functions: no I/O, no locks, so they are cheap to call per query and
//! easy to test.

use crate::model::{PodRecords, Snapshot};
use hickory_server::proto::{
    op::ResponseCode,
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, SOA},
    },
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Knobs for the zone's answers.
#[derive(Debug, Clone)]
pub(crate) struct ZoneSettings {
    /// The cluster domain, lowercase, without a trailing dot.
    pub zone: String,
    pub ttl: u32,
    pub pod_records: PodRecords,
    /// The SOA's owner, MNAME and RNAME, parsed once: building them per
    /// negative answer showed up in profiles.
    soa_names: Option<(Name, Name, Name)>,
}

impl ZoneSettings {
    pub fn new(zone: String, ttl: u32, pod_records: PodRecords) -> Self {
        let soa_names = (|| {
            Some((
                Name::from_ascii(format!("{zone}.")).ok()?,
                Name::from_ascii(format!("ns.dns.{zone}.")).ok()?,
                Name::from_ascii(format!("hostmaster.{zone}.")).ok()?,
            ))
        })();
        Self {
            zone,
            ttl,
            pod_records,
            soa_names,
        }
    }
}

/// What to do with a query.
#[derive(Debug)]
// Returned once per query and consumed at once; boxing would only add an
// allocation to the hot path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    /// An authoritative answer (possibly negative).
    Answer(Reply),
    /// Not the cluster's name: ask the upstreams.
    Forward,
    Refused,
    /// The cluster's name, but no data yet (before the first sync).
    ServFail,
}

#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The zone's SOA, for the authority section of negative answers.
    pub soa: Option<Record>,
    /// Further authority records (an upstream's SOA for a chased target).
    pub authorities: Vec<Record>,
    /// A CNAME target outside the zone whose A/AAAA records the server
    /// should fetch from the upstreams and append.
    pub chase: Option<Name>,
}

/// Longest CNAME chain followed inside the zone.
const MAX_CHASE: usize = 8;

/// `name` lowercase without the trailing dot.
pub(crate) fn normalize(name: &Name) -> String {
    let mut s = name.to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s.make_ascii_lowercase();
    s
}

fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || (name.len() > zone.len()
            && name.ends_with(zone)
            && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

pub(crate) fn soa_record(settings: &ZoneSettings, serial: i64) -> Option<Record> {
    let (zone, mname, rname) = settings.soa_names.clone()?;
    // The serial only has to move when the data does; the revision's low
    // 32 bits do that.
    let soa = SOA::new(mname, rname, serial as u32, 7200, 1800, 86400, settings.ttl);
    Some(Record::from_rdata(zone, settings.ttl, RData::SOA(soa)))
}

fn matches(rd: &RData, qtype: RecordType) -> bool {
    qtype == RecordType::ANY || rd.record_type() == qtype
}

/// Answers `qname`/`qtype`. `owner` is the name as the client spelled it,
/// used as the owner of direct answers so its case is echoed.
pub(crate) fn answer(
    snap: Option<&Snapshot>,
    settings: &ZoneSettings,
    owner: &Name,
    qtype: RecordType,
) -> Outcome {
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        return Outcome::Refused;
    }
    let qname = normalize(owner);
    let ours = in_zone(&qname, &settings.zone);
    let Some(snap) = snap else {
        return if ours {
            Outcome::ServFail
        } else {
            Outcome::Forward
        };
    };
    let Some(node) = snap.nodes.get(&qname) else {
        if ours {
            return pod_answer(snap, settings, &qname, owner, qtype);
        }
        // Reverse names of addresses the cluster does not own, and
        // everything else outside the zone, belong to the upstreams.
        return Outcome::Forward;
    };
    // Only negative answers carry it.
    let soa = || soa_record(settings, snap.revision);
    let mut reply = Reply::default();
    if qtype == RecordType::SOA && qname == settings.zone {
        reply.answers.extend(soa());
        return Outcome::Answer(reply);
    }
    // CNAME: answer it, then chase while the target is ours.
    if let Some(target) = &node.cname
        && qtype != RecordType::CNAME
    {
        let mut owner = owner.clone();
        let mut node = node;
        let mut target = target.clone();
        for _ in 0..MAX_CHASE {
            for rd in node
                .rdatas
                .iter()
                .filter(|r| r.record_type() == RecordType::CNAME)
            {
                reply
                    .answers
                    .push(Record::from_rdata(owner.clone(), settings.ttl, rd.clone()));
            }
            if !in_zone(&target, &settings.zone) {
                // Addresses of an outside target come from the upstreams
                // (the server does that I/O); other types are left to the
                // client's resolver, like CoreDNS.
                if matches!(qtype, RecordType::A | RecordType::AAAA) {
                    reply.chase = Name::from_ascii(format!("{target}.")).ok();
                }
                return Outcome::Answer(reply);
            }
            let Ok(next_owner) = Name::from_ascii(format!("{target}.")) else {
                return Outcome::Answer(reply);
            };
            let Some(next) = snap.nodes.get(&target) else {
                // RFC 6604: the rcode describes the last name of the chain.
                reply.rcode = ResponseCode::NXDomain;
                reply.soa = soa();
                return Outcome::Answer(reply);
            };
            owner = next_owner;
            node = next;
            match &node.cname {
                Some(t) => target = t.clone(),
                None => {
                    reply.answers.extend(
                        node.rdatas
                            .iter()
                            .filter(|rd| matches(rd, qtype))
                            .map(|rd| Record::from_rdata(owner.clone(), settings.ttl, rd.clone())),
                    );
                    if reply
                        .answers
                        .iter()
                        .all(|r| r.record_type() == RecordType::CNAME)
                    {
                        reply.soa = soa();
                    }
                    return Outcome::Answer(reply);
                }
            }
        }
        reply.rcode = ResponseCode::ServFail;
        return Outcome::Answer(reply);
    }
    for rd in node.rdatas.iter().filter(|rd| matches(rd, qtype)) {
        reply
            .answers
            .push(Record::from_rdata(owner.clone(), settings.ttl, rd.clone()));
        // SRV targets' addresses go to the additional section.
        if let RData::SRV(srv) = rd
            && let Some(t) = snap.nodes.get(&normalize(&srv.target))
        {
            for a in t
                .rdatas
                .iter()
                .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
            {
                reply.additionals.push(Record::from_rdata(
                    srv.target.clone(),
                    settings.ttl,
                    a.clone(),
                ));
            }
        }
    }
    if reply.answers.is_empty() {
        // NODATA: the name exists without this type.
        reply.soa = soa();
    }
    Outcome::Answer(reply)
}

/// `a-b-c-d.<ns>.pod.<zone>` (and `…--1` for IPv6).
fn pod_answer(
    snap: &Snapshot,
    settings: &ZoneSettings,
    qname: &str,
    owner: &Name,
    qtype: RecordType,
) -> Outcome {
    let soa = soa_record(settings, snap.revision);
    let nx = || {
        Outcome::Answer(Reply {
            rcode: ResponseCode::NXDomain,
            soa: soa.clone(),
            ..Reply::default()
        })
    };
    if settings.pod_records == PodRecords::Disabled {
        return nx();
    }
    let Some(rest) = qname.strip_suffix(&format!(".pod.{}", settings.zone)) else {
        return nx();
    };
    let Some((label, ns)) = rest.split_once('.') else {
        // `<ns>.pod.<zone>`: a namespace level; it exists in insecure mode.
        return match settings.pod_records {
            PodRecords::Insecure => Outcome::Answer(Reply {
                soa,
                ..Reply::default()
            }),
            _ => nx(),
        };
    };
    if ns.contains('.') {
        return nx();
    }
    let ip: IpAddr = if label.split('-').count() == 4 {
        match label.replace('-', ".").parse::<Ipv4Addr>() {
            Ok(v4) => v4.into(),
            Err(_) => return nx(),
        }
    } else {
        match label.replace('-', ":").parse::<Ipv6Addr>() {
            Ok(v6) => v6.into(),
            Err(_) => return nx(),
        }
    };
    if settings.pod_records == PodRecords::Verified && !snap.pod_ips.contains(&(ns.to_owned(), ip))
    {
        return nx();
    }
    let rd = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    let mut reply = Reply::default();
    if matches(&rd, qtype) {
        reply
            .answers
            .push(Record::from_rdata(owner.clone(), settings.ttl, rd));
    } else {
        reply.soa = soa;
    }
    Outcome::Answer(reply)
}
