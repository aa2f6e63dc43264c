//! The wire format seen from outside the crate: every message round-trips,
//! every message encodes to the exact bytes `docs/PROTOCOL.md` shows, and
//! hostile frames are refused with an error, never a panic, a deep recursion
//! or an allocation of the size they claim.
//!
//! The golden frames are the protocol. If one of these tests fails after a
//! change to `msg.rs`, the change broke compatibility with every deployed
//! node: revert it, or ship it under a new ALPN.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use servent_proto::frame::{self, FrameError, HEADER_LEN, MAX_DEPTH};
use servent_proto::limits::*;
use servent_proto::msg::*;
use servent_proto::{ContentHash, NodeId};

// ---------------------------------------------------------------------------
// Sample values

/// BLAKE3 of the empty input (`b3sum /dev/null`), so the examples can be
/// checked with ordinary tools.
const EMPTY_HASH: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

fn hash() -> ContentHash {
    EMPTY_HASH.parse().unwrap()
}

/// Bytes 00, 01, ..., 1f: easy to spot in a hex dump.
fn node() -> NodeId {
    NodeId(std::array::from_fn(|i| i as u8))
}

fn entry() -> FileEntry {
    FileEntry {
        hash: hash(),
        name: "Blue Moon.mp3".into(),
        size: 3_500_000,
    }
}

fn hit() -> Hit {
    Hit {
        hash: hash(),
        names: vec![NameVariant {
            name: "Blue Moon.mp3".into(),
            size: 3_500_000,
        }],
        sources: vec![Source {
            id: node(),
            addr: "192.0.2.7:7401".into(),
            variant: 0,
            via: None,
        }],
    }
}

/// A supernode as another one describes it (IPv4, heard from 30 s ago).
fn info() -> SupernodeInfo {
    SupernodeInfo {
        id: node(),
        addr: "198.51.100.4:7400".into(),
        leaves: 250,
        max_leaves: 1000,
        age_secs: 30,
    }
}

/// A lightly loaded supernode at an IPv6 address, heard from 4 s ago.
fn info_v6() -> SupernodeInfo {
    SupernodeInfo {
        id: node(),
        addr: "[2001:db8::7]:7400".into(),
        leaves: 12,
        max_leaves: 1000,
        age_secs: 4,
    }
}

/// The longest `IP:PORT` there is.
const LONGEST_ADDR: &str = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";

/// The biggest `SupernodeInfo`: longest address, widest integers.
fn biggest_info(i: usize) -> SupernodeInfo {
    SupernodeInfo {
        id: NodeId([i as u8; 32]),
        addr: LONGEST_ADDR.into(),
        leaves: u32::MAX,
        max_leaves: u32::MAX,
        age_secs: u32::MAX,
    }
}

fn mesh_query() -> MeshQuery {
    MeshQuery {
        id: 0x0123_4567_89ab_cdef,
        ttl: 4,
        // What an origin with a 3 s search time gives its first neighbour.
        timeout_ms: 2750,
        query: Query {
            kind: QueryKind::Keywords(vec!["blue".into(), "moon".into()]),
            max_results: 50,
        },
    }
}

/// What a leaf offering itself as a supernode says of its spare capacity.
fn candidacy() -> Candidacy {
    Candidacy {
        cpu_idle_permille: 750,
        mem_available_mib: 2048,
        upload_kbps: 20_000,
    }
}

/// A leaf just promoted, as the supernode that elected it offers it to its
/// other leaves: its address, no leaves yet, neighbour of the sender.
fn promoted_info() -> SupernodeInfo {
    SupernodeInfo {
        id: node(),
        addr: "192.0.2.7:7401".into(),
        leaves: 0,
        max_leaves: 1000,
        age_secs: 0,
    }
}

const ALL_CODES: [ErrorCode; 6] = [
    ErrorCode::BadRequest,
    ErrorCode::LimitExceeded,
    ErrorCode::RateLimited,
    ErrorCode::NotFound,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
];

// ---------------------------------------------------------------------------
// Helpers

/// Encodes, decodes and compares, and checks what the streaming parser makes
/// of every prefix of the frame and of the frame followed by more bytes.
fn round_trip<T>(msg: &T, max: usize) -> Vec<u8>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = frame::encode(msg, max).unwrap();
    let body_len = u32::from_be_bytes(bytes[..HEADER_LEN].try_into().unwrap()) as usize;
    assert_eq!(
        body_len + HEADER_LEN,
        bytes.len(),
        "header counts the body of {msg:?}"
    );
    assert_eq!(&frame::parse_exact::<T>(&bytes, max).unwrap(), msg);

    for cut in 0..bytes.len() {
        assert!(
            frame::parse::<T>(&bytes[..cut], max).unwrap().is_none(),
            "a {cut}-byte prefix of {msg:?} is not a whole frame"
        );
    }
    let mut two = bytes.clone();
    two.extend_from_slice(&bytes);
    let (first, used) = frame::parse::<T>(&two, max).unwrap().unwrap();
    assert_eq!((&first, used), (msg, bytes.len()));
    bytes
}

/// Asserts `msg` encodes to exactly the frame `golden` (hex) and decodes back.
fn golden<T>(msg: &T, max: usize, golden: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = round_trip(msg, max);
    assert_eq!(
        hex::encode(&bytes),
        golden,
        "wire encoding of {msg:?} changed"
    );
    let parsed: T = frame::parse_exact(&hex::decode(golden).unwrap(), max).unwrap();
    assert_eq!(&parsed, msg);
}

/// A frame around a hand-made body.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// MessagePack fixstr.
fn fixstr(s: &str) -> Vec<u8> {
    assert!(s.len() < 32);
    let mut out = vec![0xa0 | s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// A one-entry map `{variant: ...}`, the start of every enum with content.
fn variant(name: &str) -> Vec<u8> {
    let mut out = vec![0x81];
    out.extend(fixstr(name));
    out
}

fn bin8(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0xc4, bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

/// Decodes a hostile body as `T` with a deadline, and wants an error.
fn refused<T: DeserializeOwned + Debug>(body: &[u8], max: usize) -> FrameError {
    let start = Instant::now();
    let result = frame::parse_exact::<T>(&framed(body), max);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    match result {
        Ok(v) => panic!(
            "hostile body {} was accepted as {v:?}",
            hex::encode(&body[..body.len().min(64)])
        ),
        Err(e) => e,
    }
}

fn is_decode(e: &FrameError) -> bool {
    matches!(e, FrameError::Decode(_))
}

// ---------------------------------------------------------------------------
// Round trips of every message and every variant

#[test]
fn every_leaf_request_round_trips() {
    for port in [1, 7401, u16::MAX] {
        round_trip(
            &LeafRequest::Register { listen_port: port },
            MAX_REQUEST_FRAME,
        );
    }
    let kinds = [
        QueryKind::Keywords(vec![]),
        QueryKind::Keywords(vec!["blue".into(), "moon".into(), "Straße".into()]),
        QueryKind::Hash(hash()),
    ];
    for kind in kinds {
        for max_results in [0, 1, MAX_RESULTS, u32::MAX] {
            round_trip(
                &LeafRequest::Query(Query {
                    kind: kind.clone(),
                    max_results,
                }),
                MAX_REQUEST_FRAME,
            );
        }
    }
    round_trip(&LeafRequest::Supernodes, MAX_REQUEST_FRAME);
}

#[test]
fn every_session_update_round_trips() {
    round_trip(&SessionUpdate::Add(vec![]), MAX_UPDATE_FRAME);
    round_trip(&SessionUpdate::Remove(vec![]), MAX_UPDATE_FRAME);
    let sizes = [
        0,
        1,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        u64::MAX,
    ];
    let entries: Vec<FileEntry> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| FileEntry {
            hash: ContentHash([i as u8; 32]),
            name: format!("file {i} — ünïcode.bin"),
            size,
        })
        .collect();
    round_trip(&SessionUpdate::Add(entries.clone()), MAX_UPDATE_FRAME);
    round_trip(
        &SessionUpdate::Remove(entries.iter().map(|e| e.hash).collect()),
        MAX_UPDATE_FRAME,
    );

    // A full batch of maximal names fits the update frame.
    let full: Vec<FileEntry> = (0..MAX_FILES_PER_UPDATE)
        .map(|i| FileEntry {
            hash: ContentHash([(i % 251) as u8; 32]),
            name: "n".repeat(MAX_NAME_BYTES),
            size: u64::MAX,
        })
        .collect();
    let bytes = frame::encode(&SessionUpdate::Add(full.clone()), MAX_UPDATE_FRAME).unwrap();
    assert_eq!(
        frame::parse_exact::<SessionUpdate>(&bytes, MAX_UPDATE_FRAME).unwrap(),
        SessionUpdate::Add(full)
    );
}

#[test]
fn every_supernode_reply_round_trips() {
    round_trip(
        &SupernodeReply::Registered {
            observed_addr: "192.0.2.7:50123".into(),
        },
        MAX_REPLY_FRAME,
    );
    round_trip(
        &SupernodeReply::Registered {
            observed_addr: "[2001:db8::1]:7401".into(),
        },
        MAX_REPLY_FRAME,
    );
    round_trip(&SupernodeReply::Indexed { files: 0 }, MAX_REPLY_FRAME);
    round_trip(
        &SupernodeReply::Indexed { files: u32::MAX },
        MAX_REPLY_FRAME,
    );
    round_trip(&SupernodeReply::Hits(vec![]), MAX_REPLY_FRAME);
    round_trip(&SupernodeReply::Hits(vec![hit(), hit()]), MAX_REPLY_FRAME);
    for code in ALL_CODES {
        round_trip(
            &SupernodeReply::Error(ErrorReply::new(code, format!("{code:?} happened"))),
            MAX_REPLY_FRAME,
        );
    }

    for list in [
        vec![],
        vec![info()],
        vec![info(), info_v6(), biggest_info(9)],
    ] {
        round_trip(&SupernodeReply::Supernodes(list.clone()), MAX_REPLY_FRAME);
        round_trip(&SupernodeReply::Full(list), MAX_REPLY_FRAME);
    }

    // The largest reply the supernode builds fits its frame limit.
    let big = biggest_hit();
    let reply = SupernodeReply::Hits(vec![big; MAX_HITS_PER_FRAME]);
    let bytes = frame::encode(&reply, MAX_REPLY_FRAME).unwrap();
    assert_eq!(
        frame::parse_exact::<SupernodeReply>(&bytes, MAX_REPLY_FRAME).unwrap(),
        reply
    );
    // With a push proxy at its longest on every source, the frames a
    // supernode writes still fit.
    let mut proxied = biggest_hit();
    proxied.sources.iter_mut().for_each(|s| {
        s.via = Some(format!(
            "{:<1$}",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", MAX_VIA_BYTES
        ))
    });
    let written = SupernodeReply::Hits(vec![proxied; HITS_PER_WRITTEN_FRAME]);
    let proxied_bytes = frame::encode(&written, MAX_MESH_FRAME).unwrap();
    assert_eq!(
        frame::parse_exact::<SupernodeReply>(&proxied_bytes, MAX_MESH_FRAME).unwrap(),
        written
    );
    // A supernode relays the `Hits` frames of the mesh to its leaf as they
    // are, so a mesh reply must fit a leaf reply frame.
    const { assert!(MAX_MESH_FRAME <= MAX_REPLY_FRAME) };
    assert_eq!(
        frame::parse_exact::<SupernodeReply>(&bytes, MAX_MESH_FRAME).unwrap(),
        reply
    );
}

#[test]
fn every_mesh_message_round_trips() {
    for listen_port in [1, 7400, u16::MAX] {
        for (leaves, max_leaves) in [(0, 0), (250, 1000), (u32::MAX, u32::MAX)] {
            round_trip(
                &MeshRequest::Hello {
                    listen_port,
                    leaves,
                    max_leaves,
                },
                MAX_MESH_FRAME,
            );
        }
    }
    let kinds = [
        QueryKind::Keywords(vec!["blue".into(), "Straße".into()]),
        QueryKind::Hash(hash()),
    ];
    for kind in kinds {
        for id in [0, 1, 0x0123_4567_89ab_cdef, u64::MAX] {
            for ttl in [0, 1, 4, 7, 127, 128, u8::MAX] {
                for timeout_ms in [0, 250, 3000, u32::MAX] {
                    round_trip(
                        &MeshRequest::Query(MeshQuery {
                            id,
                            ttl,
                            timeout_ms,
                            query: Query {
                                kind: kind.clone(),
                                max_results: MAX_RESULTS,
                            },
                        }),
                        MAX_MESH_FRAME,
                    );
                }
            }
        }
    }

    round_trip(
        &MeshControl::Welcome {
            leaves: 0,
            max_leaves: 1000,
        },
        MAX_MESH_FRAME,
    );
    round_trip(
        &MeshControl::Welcome {
            leaves: u32::MAX,
            max_leaves: u32::MAX,
        },
        MAX_MESH_FRAME,
    );
    for code in ALL_CODES {
        round_trip(
            &MeshControl::Refused(ErrorReply::new(code, format!("{code:?} happened"))),
            MAX_MESH_FRAME,
        );
    }
    for known in [
        vec![],
        vec![info()],
        vec![info(), info_v6(), biggest_info(3)],
    ] {
        round_trip(
            &MeshControl::Status {
                leaves: 17,
                max_leaves: 1000,
                known: known.clone(),
                elected: false,
            },
            MAX_MESH_FRAME,
        );
        round_trip(
            &MeshControl::Status {
                leaves: 17,
                max_leaves: 1000,
                known,
                elected: true,
            },
            MAX_MESH_FRAME,
        );
    }
}

#[test]
fn every_election_message_round_trips() {
    for cpu_idle_permille in [0, 500, 1000, u16::MAX] {
        for mem_available_mib in [0, 512, u32::MAX] {
            for upload_kbps in [0, 20_000, u32::MAX] {
                let c = Candidacy {
                    cpu_idle_permille,
                    mem_available_mib,
                    upload_kbps,
                };
                round_trip(&SessionUpdate::Candidacy(c), MAX_UPDATE_FRAME);
            }
        }
    }
    for max_leaves in [0, 1, 1000, u32::MAX] {
        round_trip(&SupernodeRequest::Promote { max_leaves }, MAX_REPLY_FRAME);
    }
    for list in [
        vec![],
        vec![promoted_info()],
        vec![info(), info_v6(), biggest_info(5)],
    ] {
        round_trip(&SupernodeRequest::Rehome(list), MAX_REPLY_FRAME);
    }
    // The longest list a supernode offers fits the frame with room to spare.
    let most: Vec<SupernodeInfo> = (0..MAX_SUPERNODE_INFOS).map(biggest_info).collect();
    let rehome = SupernodeRequest::Rehome(most);
    let bytes = round_trip(&rehome, MAX_REPLY_FRAME);
    assert!(bytes.len() < 8 * 1024, "{} bytes", bytes.len());

    round_trip(&LeafReply::Accepted, MAX_REPLY_FRAME);
    for why in [
        String::new(),
        "busy".to_string(),
        "this leaf never becomes a supernode (--no-promote)".to_string(),
        "é".repeat(1000),
    ] {
        round_trip(&LeafReply::Declined(why), MAX_REPLY_FRAME);
    }
}

#[test]
fn the_largest_supernode_lists_fit_their_frames() {
    let most: Vec<SupernodeInfo> = (0..MAX_SUPERNODE_INFOS).map(biggest_info).collect();
    let status = MeshControl::Status {
        leaves: u32::MAX,
        max_leaves: u32::MAX,
        known: most.clone(),
        elected: true,
    };
    let bytes = frame::encode(&status, MAX_MESH_FRAME).unwrap();
    assert_eq!(
        frame::parse_exact::<MeshControl>(&bytes, MAX_MESH_FRAME).unwrap(),
        status
    );
    // 64 entries of 99 bytes: a few KiB (docs/PROTOCOL.md, 7.7), far below
    // the limit. Even the same list 64 times over would fit.
    assert_eq!(bytes.len(), 6363);
    assert!(bytes.len() * 64 < MAX_MESH_FRAME);
    for reply in [
        SupernodeReply::Supernodes(most.clone()),
        SupernodeReply::Full(most),
    ] {
        let bytes = frame::encode(&reply, MAX_REPLY_FRAME).unwrap();
        assert!(bytes.len() < 8 * 1024, "{} bytes", bytes.len());
        assert_eq!(
            frame::parse_exact::<SupernodeReply>(&bytes, MAX_REPLY_FRAME).unwrap(),
            reply
        );
    }

    // A mesh query wraps a leaf's query in at most 17 more bytes, so every
    // query a leaf may send can be forwarded.
    let words = vec!["w".repeat(MAX_WORD_BYTES); MAX_QUERY_WORDS];
    let query = Query {
        kind: QueryKind::Keywords(words),
        max_results: u32::MAX,
    };
    let leaf = frame::encode(&LeafRequest::Query(query.clone()), MAX_REQUEST_FRAME).unwrap();
    let mesh = frame::encode(
        &MeshRequest::Query(MeshQuery {
            id: u64::MAX,
            ttl: u8::MAX,
            timeout_ms: u32::MAX,
            query,
        }),
        MAX_MESH_FRAME,
    )
    .unwrap();
    assert!(
        mesh.len() <= leaf.len() + 17,
        "{} vs {}",
        mesh.len(),
        leaf.len()
    );
}

#[test]
fn every_transfer_message_round_trips() {
    for length in [None, Some(0), Some(1), Some(u64::MAX)] {
        for offset in [0, 1 << 20, u64::MAX] {
            round_trip(
                &RangeRequest {
                    hash: hash(),
                    offset,
                    length,
                },
                MAX_TRANSFER_FRAME,
            );
        }
    }
    round_trip(&GetReply::Ok { size: 0, length: 0 }, MAX_TRANSFER_FRAME);
    round_trip(
        &GetReply::Ok {
            size: u64::MAX,
            length: u64::MAX,
        },
        MAX_TRANSFER_FRAME,
    );
    for code in ALL_CODES {
        round_trip(
            &GetReply::Error(ErrorReply::new(code, "")),
            MAX_TRANSFER_FRAME,
        );
        // The longest message allowed still fits a transfer frame.
        round_trip(
            &GetReply::Error(ErrorReply::new(code, "é".repeat(1000))),
            MAX_TRANSFER_FRAME,
        );
    }
}

#[test]
fn error_messages_are_cut_at_a_char_boundary() {
    let long = ErrorReply::new(ErrorCode::Internal, "é".repeat(MAX_ERROR_MESSAGE));
    assert!(long.message.len() <= MAX_ERROR_MESSAGE);
    assert_eq!(long.message.len(), MAX_ERROR_MESSAGE);
    let odd = ErrorReply::new(
        ErrorCode::Internal,
        format!("x{}", "é".repeat(MAX_ERROR_MESSAGE)),
    );
    assert_eq!(
        odd.message.len(),
        MAX_ERROR_MESSAGE - 1,
        "a split 'é' is dropped whole"
    );
    assert!(odd.message.is_char_boundary(odd.message.len()));
}

// ---------------------------------------------------------------------------
// Golden bytes: the encodings docs/PROTOCOL.md shows, byte for byte

#[test]
fn golden_leaf_requests() {
    // 81 {  a8 "Register"  91 [  cd 1ce9 (7401)  ] }
    golden(
        &LeafRequest::Register { listen_port: 7401 },
        MAX_REQUEST_FRAME,
        "0000000e81a8526567697374657291cd1ce9",
    );
    // 81 { a5 "Query": 92 [ 81 { a8 "Keywords": 92 [ a4 "blue", a4 "moon" ] }, 32 (50) ] }
    golden(
        &LeafRequest::Query(Query {
            kind: QueryKind::Keywords(vec!["blue".into(), "moon".into()]),
            max_results: 50,
        }),
        MAX_REQUEST_FRAME,
        "0000001e81a551756572799281a84b6579776f72647392a4626c7565a46d6f6f6e32",
    );
    // 81 { a5 "Query": 92 [ 81 { a4 "Hash": c4 20 <32 bytes> }, cd 01f4 (500) ] }
    golden(
        &LeafRequest::Query(Query {
            kind: QueryKind::Hash(hash()),
            max_results: 500,
        }),
        MAX_REQUEST_FRAME,
        "0000003381a551756572799281a448617368c420\
         af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262cd01f4",
    );
}

/// The largest hit: every name and source at its longest.
fn biggest_hit() -> Hit {
    Hit {
        hash: hash(),
        names: (0..MAX_NAMES_PER_HIT)
            .map(|i| NameVariant {
                name: "n".repeat(MAX_NAME_BYTES),
                size: u64::MAX - i as u64,
            })
            .collect(),
        sources: (0..MAX_SOURCES_PER_HIT)
            .map(|i| Source {
                id: NodeId([i as u8; 32]),
                addr: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into(),
                variant: (i % MAX_NAMES_PER_HIT) as u8,
                via: None,
            })
            .collect(),
    }
}

#[test]
fn golden_connect_messages() {
    // 81 { a7 "Connect": 91 [ c4 20 <id> ] }
    golden(
        &LeafRequest::Connect { to: node() },
        MAX_REQUEST_FRAME,
        "0000002c81a7436f6e6e65637491c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    );
    golden(
        &SupernodeReply::Connecting {
            addr: "203.0.113.5:7401".into(),
        },
        MAX_REPLY_FRAME,
        "0000001e81aa436f6e6e656374696e6791b03230332e302e3131332e353a37343031",
    );
    golden(
        &SupernodeRequest::Connect {
            peer: node(),
            addr: "198.51.100.9:40001".into(),
        },
        MAX_REPLY_FRAME,
        "0000003f81a7436f6e6e65637492c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fb23139382e35312e3130302e393a3430303031",
    );
}

#[test]
fn golden_relay_messages() {
    // 81 { a5 "Relay": 91 [ c4 20 <id> ] }
    golden(
        &LeafRequest::Relay { to: node() },
        MAX_REQUEST_FRAME,
        "0000002a81a552656c617991c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    );
    // A unit variant is its name: a8 "Relaying".
    golden(
        &SupernodeReply::Relaying,
        MAX_REPLY_FRAME,
        "00000009a852656c6179696e67",
    );
    golden(
        &SupernodeRequest::Relay { peer: node() },
        MAX_REPLY_FRAME,
        "0000002a81a552656c617991c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    );
}

#[test]
fn a_source_with_a_push_proxy_has_a_fourth_field_and_one_without_has_three() {
    let mut s = Source {
        id: node(),
        addr: "192.0.2.7:7401".into(),
        variant: 0,
        via: None,
    };
    let without = rmp_serde::to_vec(&s).unwrap();
    assert_eq!(without[0], 0x93, "three fields, as before proxies");
    s.via = Some("198.51.100.4:7400".into());
    let with = rmp_serde::to_vec(&s).unwrap();
    assert_eq!(with[0], 0x94);
    assert_eq!(rmp_serde::from_slice::<Source>(&with).unwrap(), s);
    let old: Source = rmp_serde::from_slice(&without).unwrap();
    assert_eq!(old.via, None);
    // The holder's "the sender" is named by whoever receives it.
    s.via = Some(String::new());
    s.resolve_via(&"198.51.100.4:7400".parse().unwrap());
    assert_eq!(s.via.as_deref(), Some("198.51.100.4:7400"));
    s.resolve_via(&"203.0.113.1:7400".parse().unwrap());
    assert_eq!(
        s.via.as_deref(),
        Some("198.51.100.4:7400"),
        "a named proxy stays"
    );
}

#[test]
fn golden_leaf_supernodes_request_is_a_bare_name() {
    // aa "Supernodes" (a unit variant: the name alone, no map)
    golden(
        &LeafRequest::Supernodes,
        MAX_REQUEST_FRAME,
        "0000000baa53757065726e6f646573",
    );
}

#[test]
fn golden_session_updates() {
    // 81 { a3 "Add": 91 [ 93 [ c4 20 <hash>, ad "Blue Moon.mp3", ce 003567e0 ] ] }
    golden(
        &SessionUpdate::Add(vec![entry()]),
        MAX_UPDATE_FRAME,
        "0000003c81a34164649193c420\
         af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262\
         ad426c7565204d6f6f6e2e6d7033ce003567e0",
    );
    // 81 { a6 "Remove": 91 [ c4 20 <hash> ] }
    golden(
        &SessionUpdate::Remove(vec![hash()]),
        MAX_UPDATE_FRAME,
        "0000002b81a652656d6f766591c420\
         af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    );
}

#[test]
fn golden_supernode_replies() {
    // 81 { aa "Registered": 91 [ af "192.0.2.7:50123" ] }
    golden(
        &SupernodeReply::Registered {
            observed_addr: "192.0.2.7:50123".into(),
        },
        MAX_REPLY_FRAME,
        "0000001d81aa5265676973746572656491af3139322e302e322e373a3530313233",
    );
    // 81 { a7 "Indexed": 91 [ 01 ] }
    golden(
        &SupernodeReply::Indexed { files: 1 },
        MAX_REPLY_FRAME,
        "0000000b81a7496e64657865649101",
    );
    // 81 { a4 "Hits": 91 [ 93 [ c4 20 <hash>,
    //      91 [ 92 [ ad "Blue Moon.mp3", ce 003567e0 ] ],
    //      91 [ 93 [ c4 20 <id>, ae "192.0.2.7:7401", 00 ] ] ] ] }
    golden(
        &SupernodeReply::Hits(vec![hit()]),
        MAX_REPLY_FRAME,
        "0000007381a4486974739193c420\
         af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262\
         9192ad426c7565204d6f6f6e2e6d7033ce003567e0\
         9193c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
         ae3139322e302e322e373a3734303100",
    );
    // 81 { a5 "Error": 92 [ ab "RateLimited", a9 "slow down" ] }
    golden(
        &SupernodeReply::Error(ErrorReply::new(ErrorCode::RateLimited, "slow down")),
        MAX_REPLY_FRAME,
        "0000001e81a54572726f7292ab526174654c696d69746564a9736c6f7720646f776e",
    );
}

#[test]
fn golden_supernode_lists() {
    // 81 { aa "Supernodes": 91 [ 95 [ c4 20 <id>, b1 "198.51.100.4:7400",
    //      cc fa (250), cd 03e8 (1000), 1e (30) ] ] }
    golden(
        &SupernodeReply::Supernodes(vec![info()]),
        MAX_REPLY_FRAME,
        "0000004881aa53757065726e6f6465739195c420\
         000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
         b13139382e35312e3130302e343a37343030ccfacd03e81e",
    );
    // 81 { a4 "Full": 91 [ 95 [ c4 20 <id>, b2 "[2001:db8::7]:7400",
    //      0c (12), cd 03e8 (1000), 04 (4) ] ] }
    golden(
        &SupernodeReply::Full(vec![info_v6()]),
        MAX_REPLY_FRAME,
        "0000004281a446756c6c9195c420\
         000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
         b25b323030313a6462383a3a375d3a373430300ccd03e804",
    );
}

#[test]
fn golden_mesh_requests() {
    // 81 { a5 "Hello": 93 [ cd 1ce8 (7400), cc fa (250), cd 03e8 (1000) ] }
    golden(
        &MeshRequest::Hello {
            listen_port: 7400,
            leaves: 250,
            max_leaves: 1000,
        },
        MAX_MESH_FRAME,
        "0000001081a548656c6c6f93cd1ce8ccfacd03e8",
    );
    // 81 { a5 "Query": 94 [ cf 0123456789abcdef (id), 04 (ttl), cd 0abe (2750 ms),
    //      92 [ 81 { a8 "Keywords": 92 [ a4 "blue", a4 "moon" ] }, 32 (50) ] ] }
    golden(
        &MeshRequest::Query(mesh_query()),
        MAX_MESH_FRAME,
        "0000002c81a5517565727994cf0123456789abcdef04cd0abe\
         9281a84b6579776f72647392a4626c7565a46d6f6f6e32",
    );
}

#[test]
fn golden_walks_and_filters() {
    // 81 { a4 "Walk": 92 [ 94 [ <the query above> ], 03 (walkers) ] }
    golden(
        &MeshRequest::Walk {
            query: mesh_query(),
            walkers: 3,
        },
        MAX_MESH_FRAME,
        "0000002d81a457616c6b9294cf0123456789abcdef04cd0abe9281a84b6579776f72647392a4626c7565a46d6f6f6e3203",
    );
    // 81 { a5 "Probe": 94 [ <the query above> ] }
    golden(
        &MeshRequest::Probe(mesh_query()),
        MAX_MESH_FRAME,
        "0000002c81a550726f626594cf0123456789abcdef04cd0abe9281a84b6579776f72647392a4626c7565a46d6f6f6e32",
    );
    // 81 { a6 "Filter": 92 [ 0a (2^10 bits), c4 80 <128 bytes: bits 0, 9 and 1023 set> ] }
    let mut bits = vec![0u8; 128];
    bits[0] = 0x01;
    bits[1] = 0x02;
    bits[127] = 0x80;
    golden(
        &MeshControl::Filter {
            log2: 10,
            bits: FilterBits(bits),
        },
        MAX_MESH_FRAME,
        "0000008c81a646696c746572920ac4800102000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000080",
    );
    // 81 { ab "FilterPatch": 93 [ 09, cd 012c (300), ce 00011170 (70000) ] }
    golden(
        &MeshControl::FilterPatch(vec![9, 300, 70_000]),
        MAX_MESH_FRAME,
        "0000001781ab46696c74657250617463689309cd012cce00011170",
    );
}

#[test]
fn golden_mesh_control() {
    // 81 { a7 "Welcome": 92 [ 03, cd 03e8 (1000) ] }
    golden(
        &MeshControl::Welcome {
            leaves: 3,
            max_leaves: 1000,
        },
        MAX_MESH_FRAME,
        "0000000e81a757656c636f6d659203cd03e8",
    );
    // 81 { a7 "Refused": 92 [ ab "Unavailable", b4 "neighbour table full" ] }
    golden(
        &MeshControl::Refused(ErrorReply::new(
            ErrorCode::Unavailable,
            "neighbour table full",
        )),
        MAX_MESH_FRAME,
        "0000002b81a75265667573656492\
         ab556e617661696c61626c65b46e65696768626f7572207461626c652066756c6c",
    );
    // 81 { a6 "Status": 94 [ 03, cd 03e8 (1000), 91 [ 95 [ <info> ] ],
    //      c3 (elected) ] }
    golden(
        &MeshControl::Status {
            leaves: 3,
            max_leaves: 1000,
            known: vec![info()],
            elected: true,
        },
        MAX_MESH_FRAME,
        "0000004a81a6537461747573\
         9403cd03e8\
         9195c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
         b13139382e35312e3130302e343a37343030ccfacd03e81e\
         c3",
    );
    // A `Status` of three elements (mesh/3 before `elected` was added)
    // reads as not elected.
    let three = hex::decode(
        "0000004981a6537461747573\
         9303cd03e8\
         9195c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
         b13139382e35312e3130302e343a37343030ccfacd03e81e",
    )
    .unwrap();
    assert_eq!(
        frame::parse_exact::<MeshControl>(&three, MAX_MESH_FRAME).unwrap(),
        MeshControl::Status {
            leaves: 3,
            max_leaves: 1000,
            known: vec![info()],
            elected: false,
        }
    );
}

#[test]
fn golden_election_messages() {
    // 93 [ cd 02ee (750), cd 0800 (2048), cd 4e20 (20000) ]: a struct, so a
    // bare array; it only ever travels inside a `SessionUpdate`.
    assert_eq!(
        hex::encode(rmp_serde::to_vec(&candidacy()).unwrap()),
        "93cd02eecd0800cd4e20"
    );
    // 81 { a9 "Candidacy": 93 [ cd 02ee, cd 0800, cd 4e20 ] }
    golden(
        &SessionUpdate::Candidacy(candidacy()),
        MAX_UPDATE_FRAME,
        "0000001581a943616e64696461637993cd02eecd0800cd4e20",
    );
    // 81 { a7 "Promote": 91 [ cd 03e8 (1000) ] }
    golden(
        &SupernodeRequest::Promote { max_leaves: 1000 },
        MAX_REPLY_FRAME,
        "0000000d81a750726f6d6f746591cd03e8",
    );
    // 81 { a6 "Rehome": 91 [ 95 [ c4 20 <id>, ae "192.0.2.7:7401",
    //      00 (0 leaves), cd 03e8 (1000), 00 (age 0) ] ] }
    golden(
        &SupernodeRequest::Rehome(vec![promoted_info()]),
        MAX_REPLY_FRAME,
        "0000004081a65265686f6d659195c420\
         000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
         ae3139322e302e322e373a3734303100cd03e800",
    );
    // a8 "Accepted" (a unit variant: the name alone, no map)
    golden(
        &LeafReply::Accepted,
        MAX_REPLY_FRAME,
        "00000009a84163636570746564",
    );
    // 81 { a8 "Declined": a4 "busy" }
    golden(
        &LeafReply::Declined("busy".into()),
        MAX_REPLY_FRAME,
        "0000000f81a84465636c696e6564a462757379",
    );
}

#[test]
fn golden_transfer_messages() {
    // 93 [ c4 20 <hash>, 00 (offset 0), c0 (length nil) ]
    golden(
        &RangeRequest {
            hash: hash(),
            offset: 0,
            length: None,
        },
        MAX_TRANSFER_FRAME,
        "0000002593c420af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f326200c0",
    );
    // 93 [ c4 20 <hash>, ce 00100000 (1 MiB), ce 00010000 (64 KiB) ]
    golden(
        &RangeRequest {
            hash: hash(),
            offset: 1 << 20,
            length: Some(65_536),
        },
        MAX_TRANSFER_FRAME,
        "0000002d93c420af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262\
         ce00100000ce00010000",
    );
    // 81 { a2 "Ok": 92 [ ce 003567e0, ce 003567e0 ] }
    golden(
        &GetReply::Ok {
            size: 3_500_000,
            length: 3_500_000,
        },
        MAX_TRANSFER_FRAME,
        "0000000f81a24f6b92ce003567e0ce003567e0",
    );
    // 81 { a5 "Error": 92 [ a8 "NotFound", af "not shared here" ] }
    golden(
        &GetReply::Error(ErrorReply::new(ErrorCode::NotFound, "not shared here")),
        MAX_TRANSFER_FRAME,
        "0000002181a54572726f7292a84e6f74466f756e64af6e6f74207368617265642068657265",
    );
}

#[test]
fn golden_transfer_requests_and_range_replies() {
    let h = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
    // 81 { a5 "Layer": c4 20 <hash> }
    golden(
        &GetRequest::Layer(hash()),
        MAX_TRANSFER_FRAME,
        &format!("0000002981a54c61796572c420{h}"),
    );
    // 81 { a4 "Have": c4 20 <hash> }
    golden(
        &GetRequest::Have(hash()),
        MAX_TRANSFER_FRAME,
        &format!("0000002881a448617665c420{h}"),
    );
    // 81 { a5 "Range": 93 [ c4 20 <hash>, ce 00040000 (256 KiB), ce 00040000 ] }
    golden(
        &GetRequest::Range(RangeRequest {
            hash: hash(),
            offset: 256 * 1024,
            length: Some(256 * 1024),
        }),
        MAX_TRANSFER_FRAME,
        &format!("0000003481a552616e676593c420{h}ce00040000ce00040000"),
    );
    // 81 { a6 "Ranges": 92 [ ce 40000000 (1 GiB), c3 (true) ] }
    golden(
        &GetReply::Ranges {
            size: 1 << 30,
            partial: true,
        },
        MAX_TRANSFER_FRAME,
        "0000000f81a652616e67657392ce40000000c3",
    );
    for partial in [false, true] {
        for size in [0, 1, u64::MAX] {
            round_trip(&GetReply::Ranges { size, partial }, MAX_TRANSFER_FRAME);
        }
    }
    // A request names one of the three kinds.
    let mut body = variant("Delete");
    body.extend(bin8(hash().as_bytes()));
    assert!(is_decode(&refused::<GetRequest>(&body, MAX_TRANSFER_FRAME)));
}

#[test]
fn golden_error_codes_are_bare_names() {
    let names = [
        "BadRequest",
        "LimitExceeded",
        "RateLimited",
        "NotFound",
        "Unavailable",
        "Internal",
    ];
    for (code, name) in ALL_CODES.into_iter().zip(names) {
        assert_eq!(rmp_serde::to_vec(&code).unwrap(), fixstr(name), "{code:?}");
        assert_eq!(
            rmp_serde::from_slice::<ErrorCode>(&fixstr(name)).unwrap(),
            code
        );
    }
}

#[test]
fn golden_integers_take_their_smallest_form() {
    let cases: [(u64, &str); 9] = [
        (0, "00"),
        (127, "7f"),
        (128, "cc80"),
        (255, "ccff"),
        (256, "cd0100"),
        (65_535, "cdffff"),
        (65_536, "ce00010000"),
        (u32::MAX as u64 + 1, "cf0000000100000000"),
        (u64::MAX, "cfffffffffffffffff"),
    ];
    for (n, want) in cases {
        let reply = GetReply::Ok { size: n, length: 0 };
        let frame = frame::encode(&reply, MAX_TRANSFER_FRAME).unwrap();
        // header, 81 a2 "Ok" 92, then the size.
        let body = &frame[HEADER_LEN + 5..];
        assert_eq!(hex::encode(&body[..body.len() - 1]), want, "{n}");
    }
}

// ---------------------------------------------------------------------------
// Hostile frames

#[test]
fn a_4_gib_header_is_refused_before_any_body_arrives() {
    let header = [0xff; HEADER_LEN];
    for max in [
        MAX_REQUEST_FRAME,
        MAX_UPDATE_FRAME,
        MAX_REPLY_FRAME,
        MAX_TRANSFER_FRAME,
        MAX_MESH_FRAME,
    ] {
        let start = Instant::now();
        match frame::body_len(header, max) {
            Err(FrameError::TooLarge { len, max: m }) => {
                assert_eq!((len, m), (u32::MAX as usize, max))
            }
            other => panic!("{other:?}"),
        }
        // `parse` refuses on the header alone, instead of waiting for 4 GiB.
        assert!(matches!(
            frame::parse::<SessionUpdate>(&header, max),
            Err(FrameError::TooLarge { .. })
        ));
        let mut with_some_body = header.to_vec();
        with_some_body.extend_from_slice(&[0x81; 100]);
        assert!(matches!(
            frame::parse::<LeafRequest>(&with_some_body, max),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            frame::parse_exact::<RangeRequest>(&header, max),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}

#[test]
fn the_limit_itself_is_allowed_and_one_more_is_not() {
    let max = MAX_TRANSFER_FRAME;
    assert_eq!(
        frame::body_len((max as u32).to_be_bytes(), max).unwrap(),
        max
    );
    assert!(matches!(
        frame::body_len((max as u32 + 1).to_be_bytes(), max),
        Err(FrameError::TooLarge { len, .. }) if len == max + 1
    ));
    // The sender checks too: a message too big for its frame is not sent.
    let many = SessionUpdate::Remove(vec![hash(); 1000]);
    assert!(matches!(
        frame::encode(&many, MAX_REQUEST_FRAME),
        Err(FrameError::TooLarge { .. })
    ));
    assert!(frame::encode(&many, MAX_UPDATE_FRAME).is_ok());
}

#[test]
fn a_zero_length_frame_is_refused() {
    assert!(matches!(
        frame::body_len([0; HEADER_LEN], MAX_REQUEST_FRAME),
        Err(FrameError::Empty)
    ));
    assert!(matches!(
        frame::parse::<LeafRequest>(&[0; HEADER_LEN], MAX_REQUEST_FRAME),
        Err(FrameError::Empty)
    ));
    assert!(matches!(
        frame::parse_exact::<LeafRequest>(&[0; 8], MAX_REQUEST_FRAME),
        Err(FrameError::Empty)
    ));
}

#[test]
fn a_truncated_frame_is_refused() {
    let bytes = frame::encode(&SupernodeReply::Hits(vec![hit()]), MAX_REPLY_FRAME).unwrap();
    let half = &bytes[..bytes.len() / 2];
    match frame::parse_exact::<SupernodeReply>(half, MAX_REPLY_FRAME) {
        Err(FrameError::Truncated { expected, got }) => {
            assert_eq!((expected, got), (bytes.len(), half.len()))
        }
        other => panic!("{other:?}"),
    }
    // Not even a whole header.
    match frame::parse_exact::<SupernodeReply>(&bytes[..2], MAX_REPLY_FRAME) {
        Err(FrameError::Truncated { expected, got }) => {
            assert_eq!((expected, got), (HEADER_LEN, 2))
        }
        other => panic!("{other:?}"),
    }
    // The streaming parser just asks for more.
    assert!(frame::parse::<SupernodeReply>(half, MAX_REPLY_FRAME)
        .unwrap()
        .is_none());
    assert!(frame::parse::<SupernodeReply>(&[], MAX_REPLY_FRAME)
        .unwrap()
        .is_none());
}

#[test]
fn garbage_is_refused() {
    let bodies: [&[u8]; 7] = [
        &[0xc1],         // the one reserved MessagePack marker
        &[0xff],         // a negative fixint
        b"hello, world", // text
        &[0x80],         // an empty map: no variant
        &[
            0x82, 0xa3, b'A', b'd', b'd', 0x90, 0xa3, b'A', b'd', b'd', 0x90,
        ], // two variants
        &[0x81, 0xa4, b'N', b'o', b'p', b'e', 0x90], // unknown variant
        &[0xa8, b'R', b'e', b'g', b'i', b's', b't', b'e', b'r'], // struct variant without content
    ];
    for body in bodies {
        assert!(
            is_decode(&refused::<LeafRequest>(body, MAX_REQUEST_FRAME)),
            "{}",
            hex::encode(body)
        );
        assert!(
            is_decode(&refused::<SessionUpdate>(body, MAX_UPDATE_FRAME)),
            "{}",
            hex::encode(body)
        );
        assert!(
            is_decode(&refused::<SupernodeReply>(body, MAX_REPLY_FRAME)),
            "{}",
            hex::encode(body)
        );
        assert!(
            is_decode(&refused::<RangeRequest>(body, MAX_TRANSFER_FRAME)),
            "{}",
            hex::encode(body)
        );
        assert!(
            is_decode(&refused::<GetReply>(body, MAX_TRANSFER_FRAME)),
            "{}",
            hex::encode(body)
        );
        assert!(
            is_decode(&refused::<MeshRequest>(body, MAX_MESH_FRAME)),
            "{}",
            hex::encode(body)
        );
        assert!(
            is_decode(&refused::<MeshControl>(body, MAX_MESH_FRAME)),
            "{}",
            hex::encode(body)
        );
    }
    // Mesh variants without their content, and mesh messages on the wrong
    // kind of stream.
    for name in ["Hello", "Query"] {
        assert!(is_decode(&refused::<MeshRequest>(
            &fixstr(name),
            MAX_MESH_FRAME
        )));
    }
    for name in ["Welcome", "Refused", "Status"] {
        assert!(is_decode(&refused::<MeshControl>(
            &fixstr(name),
            MAX_MESH_FRAME
        )));
    }
    assert!(is_decode(&refused::<SupernodeReply>(
        &fixstr("Supernodes"),
        MAX_REPLY_FRAME
    )));
    let hello = frame::encode(
        &MeshRequest::Hello {
            listen_port: 7400,
            leaves: 0,
            max_leaves: 1000,
        },
        MAX_MESH_FRAME,
    )
    .unwrap();
    assert!(is_decode(&refused::<LeafRequest>(
        &hello[HEADER_LEN..],
        MAX_REQUEST_FRAME
    )));
    assert!(is_decode(&refused::<MeshControl>(
        &hello[HEADER_LEN..],
        MAX_MESH_FRAME
    )));
    let leaf_query =
        frame::encode(&LeafRequest::Query(mesh_query().query), MAX_REQUEST_FRAME).unwrap();
    assert!(
        is_decode(&refused::<MeshRequest>(
            &leaf_query[HEADER_LEN..],
            MAX_MESH_FRAME
        )),
        "a leaf's query is not a mesh query: it has no id, TTL or timeout"
    );
}

#[test]
fn wrong_types_and_arities_are_refused() {
    let mut h = bin8(hash().as_bytes());
    // RangeRequest with two fields, then with four.
    let mut two = vec![0x92];
    two.extend(&h);
    two.push(0x00);
    assert!(is_decode(&refused::<RangeRequest>(
        &two,
        MAX_TRANSFER_FRAME
    )));
    let mut four = vec![0x94];
    four.extend(&h);
    four.extend([0x00, 0xc0, 0x00]);
    assert!(is_decode(&refused::<RangeRequest>(
        &four,
        MAX_TRANSFER_FRAME
    )));
    // A negative offset, a float offset, a string length.
    for tail in [
        &[0xff, 0xc0][..],
        &[0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0xc0],
        &[0x00, 0xa1, b'1'],
    ] {
        let mut body = vec![0x93];
        body.extend(&h);
        body.extend_from_slice(tail);
        assert!(
            is_decode(&refused::<RangeRequest>(&body, MAX_TRANSFER_FRAME)),
            "{}",
            hex::encode(&body)
        );
    }
    // A port that does not fit 16 bits.
    let mut body = variant("Register");
    body.extend([0x91, 0xce, 0x00, 0x01, 0x11, 0x70]); // 70000
    assert!(is_decode(&refused::<LeafRequest>(&body, MAX_REQUEST_FRAME)));
    // A TTL that does not fit 8 bits, a negative id.
    for (id, ttl) in [(&[0x01][..], &[0xcd, 0x01, 0x00][..]), (&[0xff], &[0x04])] {
        let mut body = variant("Query");
        body.push(0x94);
        body.extend_from_slice(id);
        body.extend_from_slice(ttl);
        body.extend([0xcd, 0x0b, 0xb8]);
        body.extend(&frame::encode(&mesh_query().query, MAX_MESH_FRAME).unwrap()[HEADER_LEN..]);
        assert!(
            is_decode(&refused::<MeshRequest>(&body, MAX_MESH_FRAME)),
            "{}",
            hex::encode(&body)
        );
    }
    // A listen port that does not fit 16 bits; a Hello without its load.
    let mut body = variant("Hello");
    body.extend([0x93, 0xce, 0x00, 0x01, 0x11, 0x70, 0x00, 0x00]);
    assert!(is_decode(&refused::<MeshRequest>(&body, MAX_MESH_FRAME)));
    let mut body = variant("Hello");
    body.extend([0x91, 0xcd, 0x1c, 0xe8]);
    assert!(is_decode(&refused::<MeshRequest>(&body, MAX_MESH_FRAME)));
    // A Status without its list; a SupernodeInfo without its age.
    let mut body = variant("Status");
    body.extend([0x92, 0x00, 0x00]);
    assert!(is_decode(&refused::<MeshControl>(&body, MAX_MESH_FRAME)));
    let mut body = variant("Supernodes");
    body.extend([0x91, 0x94]);
    body.extend(bin8(node().as_bytes()));
    body.extend(fixstr("198.51.100.4:7400"));
    body.extend([0x00, 0x00]);
    assert!(is_decode(&refused::<SupernodeReply>(
        &body,
        MAX_REPLY_FRAME
    )));
    // A file name that is not UTF-8.
    let mut body = variant("Add");
    body.extend([0x91, 0x93]);
    body.append(&mut h);
    body.extend([0xa2, 0xc3, 0x28, 0x00]);
    assert!(is_decode(&refused::<SessionUpdate>(
        &body,
        MAX_UPDATE_FRAME
    )));
}

#[test]
fn ids_must_be_a_bin_of_exactly_32_bytes() {
    for bad in [
        bin8(&[7; 31]),
        bin8(&[7; 33]),
        bin8(&[]),
        fixstr("af1349b9f5f9a1a6a0404dea36dcc94"),
    ] {
        // As the node id of a source in a hit...
        let mut body = variant("Hits");
        body.extend([0x91, 0x93]);
        body.extend(bin8(hash().as_bytes()));
        body.extend([0x91, 0x92]);
        body.extend(fixstr("a"));
        body.extend([0x01, 0x91, 0x93]);
        body.extend(&bad);
        body.extend(fixstr("192.0.2.7:7401"));
        body.push(0x00);
        assert!(
            is_decode(&refused::<SupernodeReply>(&body, MAX_REPLY_FRAME)),
            "{}",
            hex::encode(&bad)
        );
        // ...as the id of a supernode in a list...
        for name in ["Supernodes", "Full"] {
            let mut body = variant(name);
            body.extend([0x91, 0x95]);
            body.extend(&bad);
            body.extend(fixstr("198.51.100.4:7400"));
            body.extend([0x00, 0x00, 0x00]);
            assert!(
                is_decode(&refused::<SupernodeReply>(&body, MAX_REPLY_FRAME)),
                "{name} {}",
                hex::encode(&bad)
            );
        }
        let mut body = variant("Status");
        body.extend([0x93, 0x00, 0x00, 0x91, 0x95]);
        body.extend(&bad);
        body.extend(fixstr("198.51.100.4:7400"));
        body.extend([0x00, 0x00, 0x00]);
        assert!(
            is_decode(&refused::<MeshControl>(&body, MAX_MESH_FRAME)),
            "{}",
            hex::encode(&bad)
        );
        // ...and as the hash of a transfer request.
        let mut body = vec![0x93];
        body.extend(&bad);
        body.extend([0x00, 0xc0]);
        assert!(
            is_decode(&refused::<RangeRequest>(&body, MAX_TRANSFER_FRAME)),
            "{}",
            hex::encode(&bad)
        );
    }
    // 32 integers in an array are not a bin either.
    let mut body = vec![0xdc, 0x00, 0x20];
    body.extend([0x07; 32]);
    body.extend([0x00, 0xc0]);
    assert!(is_decode(&refused::<RangeRequest>(
        &body,
        MAX_TRANSFER_FRAME
    )));
    // 32 bytes are right.
    let mut body = vec![0x93];
    body.extend(bin8(&[7; 32]));
    body.extend([0x00, 0xc0]);
    let ok: RangeRequest = frame::parse_exact(&framed(&body), MAX_TRANSFER_FRAME).unwrap();
    assert_eq!(ok.hash, ContentHash([7; 32]));
}

#[test]
fn lengths_claiming_more_than_the_frame_holds_are_refused_without_allocating() {
    // A str8 variant name claiming 255 bytes, with 2 present.
    assert!(is_decode(&refused::<LeafRequest>(
        &[0x81, 0xd9, 0xff, b'R', b'e'],
        MAX_REQUEST_FRAME
    )));
    // A str32 file name claiming 4 GiB.
    let mut body = variant("Add");
    body.extend([0x91, 0x93]);
    body.extend(bin8(hash().as_bytes()));
    body.extend([0xdb, 0xff, 0xff, 0xff, 0xff, b'a', b'b', b'c']);
    assert!(is_decode(&refused::<SessionUpdate>(
        &body,
        MAX_UPDATE_FRAME
    )));
    // A bin32 hash claiming 4 GiB.
    let body = [0x93, 0xc6, 0xff, 0xff, 0xff, 0xff, 0x00];
    assert!(is_decode(&refused::<RangeRequest>(
        &body,
        MAX_TRANSFER_FRAME
    )));
    // An array32 of 4 billion file entries, hashes, hits, words.
    for (name, decode) in [
        (
            "Add",
            (|b: &[u8]| refused::<SessionUpdate>(b, MAX_UPDATE_FRAME)) as fn(&[u8]) -> FrameError,
        ),
        ("Remove", |b| refused::<SessionUpdate>(b, MAX_UPDATE_FRAME)),
        ("Hits", |b| refused::<SupernodeReply>(b, MAX_REPLY_FRAME)),
        ("Keywords", |b| refused::<QueryKind>(b, MAX_REQUEST_FRAME)),
        ("Supernodes", |b| {
            refused::<SupernodeReply>(b, MAX_REPLY_FRAME)
        }),
        ("Full", |b| refused::<SupernodeReply>(b, MAX_REPLY_FRAME)),
    ] {
        let mut body = variant(name);
        body.extend([0xdd, 0xff, 0xff, 0xff, 0xff]);
        body.extend([0x93; 16]);
        assert!(is_decode(&decode(&body)), "{name}");
    }
    // A Status claiming 4 billion known supernodes.
    let mut body = variant("Status");
    body.extend([0x93, 0x00, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff]);
    body.extend([0x95; 16]);
    assert!(is_decode(&refused::<MeshControl>(&body, MAX_MESH_FRAME)));
    // A map32 of 4 billion entries where a struct is expected.
    let body = [0xdf, 0xff, 0xff, 0xff, 0xff, 0xa4, b'h', b'a', b's', b'h'];
    assert!(is_decode(&refused::<RangeRequest>(
        &body,
        MAX_TRANSFER_FRAME
    )));
}

#[test]
fn deep_nesting_is_refused_without_deep_recursion() {
    const LEVELS: usize = 100_000;
    // Run on a small stack: a decoder that recursed once per level would
    // overflow it long before the end.
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let mut arrays = vec![0x91; LEVELS];
            arrays.push(0xc0);
            let mut maps = Vec::with_capacity(LEVELS * 3 + 1);
            for _ in 0..LEVELS {
                maps.extend([0x81, 0xa1, b'k']);
            }
            maps.push(0xc0);
            for body in [&arrays, &maps] {
                assert!(is_decode(&refused::<LeafRequest>(body, MAX_UPDATE_FRAME)));
                assert!(is_decode(&refused::<SessionUpdate>(body, MAX_UPDATE_FRAME)));
                assert!(is_decode(&refused::<SupernodeReply>(
                    body,
                    MAX_UPDATE_FRAME
                )));
                assert!(is_decode(&refused::<RangeRequest>(body, MAX_UPDATE_FRAME)));
                assert!(is_decode(&refused::<GetReply>(body, MAX_UPDATE_FRAME)));
                assert!(is_decode(&refused::<MeshRequest>(body, MAX_MESH_FRAME)));
                assert!(is_decode(&refused::<MeshControl>(body, MAX_MESH_FRAME)));
                assert!(is_decode(&refused::<IgnoredAny>(body, MAX_UPDATE_FRAME)));
            }
            // Where the decoder does skip what it does not know (an unknown
            // field of a struct sent as a map), the depth limit stops it.
            let mut body = variant("Add");
            body.extend([0x91, 0x81]);
            body.extend(fixstr("zzz"));
            body.extend(&arrays);
            assert!(is_decode(&refused::<SessionUpdate>(
                &body,
                MAX_UPDATE_FRAME
            )));
        })
        .unwrap()
        .join()
        .expect("decoding deep nesting must not overflow the stack");
}

#[test]
fn the_depth_limit_is_exact() {
    let nested = |levels: usize| {
        let mut body = vec![0x91; levels];
        body.push(0xc0);
        framed(&body)
    };
    // MAX_DEPTH counts the top level: arrays nested MAX_DEPTH - 1 deep pass.
    assert!(frame::parse_exact::<IgnoredAny>(&nested(MAX_DEPTH - 1), MAX_REQUEST_FRAME).is_ok());
    let err = frame::parse_exact::<IgnoredAny>(&nested(MAX_DEPTH), MAX_REQUEST_FRAME).unwrap_err();
    assert!(err.to_string().contains("depth"), "{err}");
}

#[test]
fn trailing_bytes_are_refused() {
    let good = frame::encode(
        &RangeRequest {
            hash: hash(),
            offset: 0,
            length: None,
        },
        MAX_TRANSFER_FRAME,
    )
    .unwrap();
    // Inside the frame: the header counts a byte the message does not use.
    let mut body = good[HEADER_LEN..].to_vec();
    body.push(0xc0);
    let err = refused::<RangeRequest>(&body, MAX_TRANSFER_FRAME);
    assert!(err.to_string().contains("1 trailing bytes"), "{err}");
    // After the frame: `parse_exact` wants exactly one frame.
    let mut after = good.clone();
    after.extend_from_slice(&[0, 0]);
    let err = frame::parse_exact::<RangeRequest>(&after, MAX_TRANSFER_FRAME).unwrap_err();
    assert!(
        is_decode(&err) && err.to_string().contains("2 trailing bytes"),
        "{err}"
    );
    // Two messages in one frame.
    let mut two = good[HEADER_LEN..].to_vec();
    two.extend_from_slice(&good[HEADER_LEN..]);
    assert!(is_decode(&refused::<RangeRequest>(
        &two,
        MAX_TRANSFER_FRAME
    )));
}

/// Mutated and random frames never panic the decoder: whatever comes back is
/// an error or a message that encodes again.
#[test]
fn mutated_frames_never_panic() {
    // xorshift64*: deterministic, no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let seeds = [
        frame::encode(
            &LeafRequest::Register { listen_port: 7401 },
            MAX_REQUEST_FRAME,
        )
        .unwrap(),
        frame::encode(
            &SessionUpdate::Add(vec![entry(), entry()]),
            MAX_UPDATE_FRAME,
        )
        .unwrap(),
        frame::encode(&SupernodeReply::Hits(vec![hit()]), MAX_REPLY_FRAME).unwrap(),
        frame::encode(
            &RangeRequest {
                hash: hash(),
                offset: 9,
                length: Some(3),
            },
            MAX_TRANSFER_FRAME,
        )
        .unwrap(),
        frame::encode(
            &GetReply::Error(ErrorReply::new(ErrorCode::NotFound, "no")),
            MAX_TRANSFER_FRAME,
        )
        .unwrap(),
        frame::encode(&MeshRequest::Query(mesh_query()), MAX_MESH_FRAME).unwrap(),
        frame::encode(
            &MeshControl::Status {
                leaves: 3,
                max_leaves: 1000,
                known: vec![info(), info_v6()],
                elected: false,
            },
            MAX_MESH_FRAME,
        )
        .unwrap(),
        frame::encode(
            &SupernodeReply::Full(vec![info_v6(), info()]),
            MAX_REPLY_FRAME,
        )
        .unwrap(),
    ];
    for i in 0..20_000 {
        let mut bytes = seeds[i % seeds.len()].clone();
        match next() % 4 {
            // Flip a few body bytes, then fix the header so the body is parsed.
            0 | 1 => {
                for _ in 0..1 + next() % 4 {
                    let at = HEADER_LEN + (next() as usize) % (bytes.len() - HEADER_LEN);
                    bytes[at] = next() as u8;
                }
            }
            // Cut the body short.
            2 => bytes.truncate(HEADER_LEN + 1 + (next() as usize) % (bytes.len() - HEADER_LEN)),
            // Random bytes.
            _ => {
                let len = 1 + (next() as usize) % 64;
                bytes = (0..HEADER_LEN + len).map(|_| next() as u8).collect();
            }
        }
        let len = (bytes.len() - HEADER_LEN) as u32;
        bytes[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());

        if let Ok(m) = frame::parse_exact::<LeafRequest>(&bytes, MAX_UPDATE_FRAME) {
            frame::encode(&m, MAX_UPDATE_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<SessionUpdate>(&bytes, MAX_UPDATE_FRAME) {
            frame::encode(&m, MAX_UPDATE_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<SupernodeReply>(&bytes, MAX_UPDATE_FRAME) {
            frame::encode(&m, MAX_UPDATE_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<RangeRequest>(&bytes, MAX_UPDATE_FRAME) {
            frame::encode(&m, MAX_UPDATE_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<GetReply>(&bytes, MAX_UPDATE_FRAME) {
            frame::encode(&m, MAX_UPDATE_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<MeshRequest>(&bytes, MAX_MESH_FRAME) {
            frame::encode(&m, MAX_MESH_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<MeshControl>(&bytes, MAX_MESH_FRAME) {
            frame::encode(&m, MAX_MESH_FRAME).unwrap();
        }
    }
}

#[test]
fn hostile_election_messages_are_refused() {
    // Variants without their content, or with content they do not have.
    for name in ["Promote", "Rehome"] {
        assert!(is_decode(&refused::<SupernodeRequest>(
            &fixstr(name),
            MAX_REPLY_FRAME
        )));
    }
    assert!(is_decode(&refused::<LeafReply>(
        &fixstr("Declined"),
        MAX_REPLY_FRAME
    )));
    assert!(is_decode(&refused::<SessionUpdate>(
        &fixstr("Candidacy"),
        MAX_UPDATE_FRAME
    )));
    // Unknown variants, and messages of one direction sent the other way.
    for name in ["Promoted", "Demote", "Register", "Supernodes"] {
        assert!(is_decode(&refused::<SupernodeRequest>(
            &fixstr(name),
            MAX_REPLY_FRAME
        )));
    }
    for name in ["Declined ", "accepted", "Indexed"] {
        assert!(is_decode(&refused::<LeafReply>(
            &fixstr(name),
            MAX_REPLY_FRAME
        )));
    }
    let promote = frame::encode(
        &SupernodeRequest::Promote { max_leaves: 1000 },
        MAX_REPLY_FRAME,
    )
    .unwrap();
    assert!(is_decode(&refused::<LeafRequest>(
        &promote[HEADER_LEN..],
        MAX_REQUEST_FRAME
    )));
    assert!(is_decode(&refused::<SupernodeReply>(
        &promote[HEADER_LEN..],
        MAX_REPLY_FRAME
    )));
    let accepted = frame::encode(&LeafReply::Accepted, MAX_REPLY_FRAME).unwrap();
    assert!(is_decode(&refused::<SupernodeRequest>(
        &accepted[HEADER_LEN..],
        MAX_REPLY_FRAME
    )));
    // An idle CPU figure that does not fit 16 bits; a negative memory
    // figure; a candidacy without its upload figure, or with a fourth field.
    for fields in [
        &[0x93, 0xce, 0x00, 0x01, 0x11, 0x70, 0x00, 0x00][..],
        &[0x93, 0x00, 0xff, 0x00],
        &[0x92, 0x00, 0x00],
        &[0x94, 0x00, 0x00, 0x00, 0x00],
    ] {
        let mut body = variant("Candidacy");
        body.extend_from_slice(fields);
        assert!(
            is_decode(&refused::<SessionUpdate>(&body, MAX_UPDATE_FRAME)),
            "{}",
            hex::encode(&body)
        );
    }
    // A max_leaves that does not fit 32 bits.
    let mut body = variant("Promote");
    body.extend([0x91, 0xcf, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00]);
    assert!(is_decode(&refused::<SupernodeRequest>(
        &body,
        MAX_REPLY_FRAME
    )));
    // A reason that is not UTF-8.
    let mut body = variant("Declined");
    body.extend([0xa2, 0xc3, 0x28]);
    assert!(is_decode(&refused::<LeafReply>(&body, MAX_REPLY_FRAME)));
    // A supernode in a Rehome list whose id is not 32 bytes.
    let mut body = variant("Rehome");
    body.extend([0x91, 0x95]);
    body.extend(bin8(&[7; 31]));
    body.extend(fixstr("192.0.2.7:7401"));
    body.extend([0x00, 0x00, 0x00]);
    assert!(is_decode(&refused::<SupernodeRequest>(
        &body,
        MAX_REPLY_FRAME
    )));
    // A Rehome list claiming 4 billion supernodes, and a reason claiming 4 GiB.
    let mut body = variant("Rehome");
    body.extend([0xdd, 0xff, 0xff, 0xff, 0xff]);
    body.extend([0x95; 16]);
    assert!(is_decode(&refused::<SupernodeRequest>(
        &body,
        MAX_REPLY_FRAME
    )));
    let mut body = variant("Declined");
    body.extend([0xdb, 0xff, 0xff, 0xff, 0xff, b'n', b'o']);
    assert!(is_decode(&refused::<LeafReply>(&body, MAX_REPLY_FRAME)));
}

/// Mutated election frames never panic the decoders either.
#[test]
fn mutated_election_frames_never_panic() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    };
    let seeds = [
        frame::encode(&SessionUpdate::Candidacy(candidacy()), MAX_UPDATE_FRAME).unwrap(),
        frame::encode(
            &SupernodeRequest::Promote { max_leaves: 1000 },
            MAX_REPLY_FRAME,
        )
        .unwrap(),
        frame::encode(
            &SupernodeRequest::Rehome(vec![promoted_info(), info_v6()]),
            MAX_REPLY_FRAME,
        )
        .unwrap(),
        frame::encode(&LeafReply::Accepted, MAX_REPLY_FRAME).unwrap(),
        frame::encode(&LeafReply::Declined("busy".into()), MAX_REPLY_FRAME).unwrap(),
    ];
    for i in 0..10_000 {
        let mut bytes = seeds[i % seeds.len()].clone();
        if next() % 2 == 0 {
            for _ in 0..1 + next() % 4 {
                let at = HEADER_LEN + (next() as usize) % (bytes.len() - HEADER_LEN);
                bytes[at] = next() as u8;
            }
        } else {
            bytes.truncate(HEADER_LEN + 1 + (next() as usize) % (bytes.len() - HEADER_LEN));
        }
        let len = (bytes.len() - HEADER_LEN) as u32;
        bytes[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        if let Ok(m) = frame::parse_exact::<SessionUpdate>(&bytes, MAX_UPDATE_FRAME) {
            frame::encode(&m, MAX_UPDATE_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<SupernodeRequest>(&bytes, MAX_REPLY_FRAME) {
            frame::encode(&m, MAX_REPLY_FRAME).unwrap();
        }
        if let Ok(m) = frame::parse_exact::<LeafReply>(&bytes, MAX_REPLY_FRAME) {
            frame::encode(&m, MAX_REPLY_FRAME).unwrap();
        }
    }
}

#[test]
fn alpns_are_pinned() {
    assert_eq!(ALPN_LEAF, b"servent-leaf/2");
    assert_eq!(ALPN_TRANSFER, b"servent-xfer/3");
    assert_eq!(ALPN_MESH, b"servent-mesh/3");
}
