use super::*;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn sample(seq: u64, busy: f64, age_ms: u64) -> CpuSample {
    CpuSample {
        seq,
        ts_ms: 1_764_537_600_000u64.wrapping_add(seq),
        busy_pct: busy,
        cores: 2,
        age_ms,
    }
}

fn hello() -> Hello {
    Hello {
        node: "web-1".into(),
        boot: 42,
        instance_id: Some("i-0abc".into()),
        uptime_ms: Some(3_600_000),
        interval_ms: 1000,
        buffer: 5,
        nonce: String::new(),
    }
}

/// A master channel through `via` and an agent that answered it: the master has taken the
/// hello, the agent the welcome.
fn pair(via_master: &str, via_agent: &str) -> (MasterChannel, AgentChannel) {
    let (mut m, challenge) = MasterChannel::open(via_master);
    let (mut a, line) =
        AgentChannel::answer(challenge.trim_end().as_bytes(), via_agent, hello(), KEY).unwrap();
    let Event::Hello { welcome, key, .. } =
        m.accept(line.trim_end().as_bytes(), &[KEY], 0).unwrap()
    else {
        panic!("no hello")
    };
    assert_eq!(key, 0);
    a.welcome(welcome.trim_end().as_bytes()).unwrap();
    (m, a)
}

#[test]
fn round_trip() {
    let frames = [
        Frame::Cpu(sample(0, 0.0, 0)),
        Frame::Cpu(sample(17, 73.2, 61_000)),
        Frame::Challenge(Challenge {
            nonce: "ab".repeat(32),
        }),
        Frame::Welcome(Welcome { mac: "cd".into() }),
    ];
    for f in frames {
        let line = encode(&f);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert!(line.starts_with("{\"v\":2,"), "{line}");
        assert_eq!(decode(line.trim_end().as_bytes()).unwrap(), f);
    }
    let mut h = hello();
    h.nonce = new_nonce();
    let line = encode(&Frame::Hello(h.clone()));
    assert_eq!(decode(line.trim_end().as_bytes()).unwrap(), Frame::Hello(h));
}

#[test]
fn a_channel_carries_authenticated_samples() {
    let (mut m, a) = pair("tcp:9700", "tcp:9700");
    assert_eq!(m.hello().unwrap().node, "web-1");
    for seq in 0..5 {
        let line = a.sample(&sample(seq, 12.5, 0));
        assert!(line.ends_with("\"}\n") && line.len() < 300, "{line}");
        assert_eq!(
            m.accept(line.trim_end().as_bytes(), &[], seq * 1000)
                .unwrap(),
            Event::Sample(sample(seq, 12.5, 0))
        );
    }
    // Floats that do not print short still verify: the MAC covers the bytes as sent.
    let odd = sample(5, 100.0 / 3.0, 0);
    assert_eq!(
        m.accept(a.sample(&odd).trim_end().as_bytes(), &[], 6000),
        Ok(Event::Sample(odd))
    );
}

#[test]
fn frames_without_the_session_key_are_refused() {
    let (mut m, a) = pair("tcp:9700", "tcp:9700");
    let good = a.sample(&sample(1, 10.0, 0));
    // A frame as a relaying local user would write it: no MAC, a made-up one, one copied from
    // another frame, a changed value under the old MAC, a field added after the MAC.
    let unmaced = encode(&Frame::Cpu(sample(2, 99.0, 0)));
    let made_up = unmaced.trim_end().trim_end_matches('}').to_string()
        + &format!(",\"mac\":\"{}\"}}", "0".repeat(32));
    let copied_mac = good.rsplit_once(",\"mac\"").unwrap().1;
    let moved = encode(&Frame::Cpu(sample(2, 99.0, 0)))
        .trim_end()
        .trim_end_matches('}')
        .to_string()
        + ",\"mac\""
        + copied_mac.trim_end();
    let changed = good.replace("\"busy_pct\":10.0", "\"busy_pct\":99.0");
    assert_ne!(changed, good);
    let appended = good.trim_end().trim_end_matches('}').to_string() + ",\"x\":1}";
    for (bad, want) in [
        (unmaced.as_str(), DecodeError::NoMac),
        (made_up.as_str(), DecodeError::Forged),
        (moved.as_str(), DecodeError::Forged),
        (changed.as_str(), DecodeError::Forged),
        (appended.as_str(), DecodeError::NoMac),
    ] {
        assert_eq!(
            m.accept(bad.trim_end().as_bytes(), &[], 1000),
            Err(want),
            "{bad}"
        );
    }
    // A frame of another channel of the same agent does not verify here either.
    let (_, other) = pair("tcp:9700", "tcp:9700");
    let theirs = other.sample(&sample(3, 10.0, 0));
    assert_eq!(
        m.accept(theirs.trim_end().as_bytes(), &[], 1000),
        Err(DecodeError::Forged)
    );
    assert!(m.accept(good.trim_end().as_bytes(), &[], 1000).is_ok());
}

#[test]
fn a_hello_made_for_another_forward_or_key_is_refused() {
    // A local user relays master B's challenge (forward tcp:9701) to the agent, which
    // connected to the port it reports to master A on (tcp:9700).
    let (mut b, challenge) = MasterChannel::open("tcp:9701");
    let (_, line) =
        AgentChannel::answer(challenge.trim_end().as_bytes(), "tcp:9700", hello(), KEY).unwrap();
    assert_eq!(
        b.accept(line.trim_end().as_bytes(), &[KEY], 0),
        Err(DecodeError::Unauthenticated)
    );
    // The same channel, a key the master does not hold.
    let (mut m, challenge) = MasterChannel::open("tcp:9700");
    let (_, line) = AgentChannel::answer(
        challenge.trim_end().as_bytes(),
        "tcp:9700",
        hello(),
        b"another secret of 32 characters!",
    )
    .unwrap();
    assert_eq!(
        m.accept(line.trim_end().as_bytes(), &[KEY], 0),
        Err(DecodeError::Unauthenticated)
    );
    // A hello answering another challenge (captured earlier) is refused.
    let (_, old_challenge) = MasterChannel::open("tcp:9700");
    let (mut m, _) = MasterChannel::open("tcp:9700");
    let (_, replayed) = AgentChannel::answer(
        old_challenge.trim_end().as_bytes(),
        "tcp:9700",
        hello(),
        KEY,
    )
    .unwrap();
    assert_eq!(
        m.accept(replayed.trim_end().as_bytes(), &[KEY], 0),
        Err(DecodeError::Unauthenticated)
    );
    // Any change to the hello breaks its MAC: another node name, say.
    let (mut m, challenge) = MasterChannel::open("tcp:9700");
    let (_, line) =
        AgentChannel::answer(challenge.trim_end().as_bytes(), "tcp:9700", hello(), KEY).unwrap();
    let renamed = line.replace("\"node\":\"web-1\"", "\"node\":\"web-2\"");
    assert_eq!(
        m.accept(renamed.trim_end().as_bytes(), &[KEY], 0),
        Err(DecodeError::Unauthenticated)
    );
    // The second candidate key (the host's launch key) is accepted and named.
    let launch = launch_key(KEY, "as-1-2");
    assert_eq!(launch.len(), 64);
    assert_eq!(launch, launch_key(KEY, "as-1-2"), "derived, not random");
    assert_ne!(launch, launch_key(KEY, "as-1-3"));
    let (mut m, challenge) = MasterChannel::open("unix:/run/autoscaler/a.sock");
    let (_, line) = AgentChannel::answer(
        challenge.trim_end().as_bytes(),
        "unix:/run/autoscaler/a.sock",
        hello(),
        launch.as_bytes(),
    )
    .unwrap();
    let Ok(Event::Hello { key, .. }) =
        m.accept(line.trim_end().as_bytes(), &[KEY, launch.as_bytes()], 0)
    else {
        panic!("the launch key is a candidate")
    };
    assert_eq!(key, 1);
}

#[test]
fn the_agent_checks_the_master() {
    let (_, challenge) = MasterChannel::open("tcp:9700");
    let (mut a, _) =
        AgentChannel::answer(challenge.trim_end().as_bytes(), "tcp:9700", hello(), KEY).unwrap();
    // Whoever listens without the secret cannot make the welcome.
    let fake = encode(&Frame::Welcome(Welcome {
        mac: "00".repeat(32),
    }));
    assert_eq!(
        a.welcome(fake.trim_end().as_bytes()),
        Err(DecodeError::NotTheMaster)
    );
    let not = encode(&Frame::Challenge(Challenge {
        nonce: "ab".repeat(32),
    }));
    assert!(a.welcome(not.trim_end().as_bytes()).is_err());
    // A first line that is not a challenge.
    assert_eq!(
        AgentChannel::answer(
            b"{\"v\":2,\"type\":\"welcome\",\"mac\":\"00\"}",
            "tcp:1",
            hello(),
            KEY
        )
        .err(),
        Some(DecodeError::NoChallenge)
    );
    assert_eq!(
        AgentChannel::answer(
            b"{\"v\":2,\"type\":\"challenge\",\"nonce\":\"ab\"}",
            "tcp:1",
            hello(),
            KEY
        )
        .err(),
        Some(DecodeError::NoChallenge),
        "a short nonce"
    );
}

#[test]
fn a_channel_keeps_to_the_rate_its_hello_declared() {
    let (mut m, a) = pair("tcp:9700", "tcp:9700");
    // The buffer (5) resent at once, then live samples: a burst of 10, then 3 per interval.
    for seq in 0..5 {
        let line = a.sample(&sample(seq, 1.0, 60_000));
        assert!(m.accept(line.trim_end().as_bytes(), &[], 0).is_ok());
    }
    let mut seq = 5;
    let mut send = |m: &mut MasterChannel, now| {
        let line = a.sample(&sample(seq, 1.0, 0));
        seq += 1;
        m.accept(line.trim_end().as_bytes(), &[], now)
    };
    for _ in 0..LIVE_BURST {
        assert!(send(&mut m, 0).is_ok());
    }
    assert_eq!(send(&mut m, 0), Err(DecodeError::TooMany));
    // One interval later, three more.
    let (mut m, a2) = pair("tcp:9700", "tcp:9700");
    let mut seq = 0;
    let mut send = |m: &mut MasterChannel, now| {
        let line = a2.sample(&sample(seq, 1.0, 0));
        seq += 1;
        m.accept(line.trim_end().as_bytes(), &[], now)
    };
    for _ in 0..LIVE_BURST {
        assert!(send(&mut m, 0).is_ok());
    }
    for _ in 0..3 {
        assert!(send(&mut m, 1000).is_ok());
    }
    assert_eq!(send(&mut m, 1000), Err(DecodeError::TooMany));
    // A steady agent at its interval never comes near the bound, for an hour.
    let (mut m, a3) = pair("tcp:9700", "tcp:9700");
    for seq in 0..3600 {
        let line = a3.sample(&sample(seq, 1.0, 0));
        assert!(m
            .accept(line.trim_end().as_bytes(), &[], seq * 1000)
            .is_ok());
    }
}

#[test]
fn refuses_bad_lines() {
    let long = format!(
        r#"{{"v":2,"type":"hello","node":"{}","boot":1}}"#,
        "a".repeat(MAX_LINE)
    );
    let nonce = "ab".repeat(32);
    let hello_with = |extra: &str| {
        format!(
            r#"{{"v":2,"type":"hello","node":"a","boot":1,"interval_ms":1000,"buffer":1,"nonce":"{nonce}"{extra}}}"#
        )
        .into_bytes()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (long.into_bytes(), "longer than"),
        (b"\xff\xfe{}".to_vec(), "UTF-8"),
        (
            br#"{"v":2,"type":"cpu","seq":1,"#.to_vec(),
            "not a JSON object",
        ),
        (b"".to_vec(), "not a JSON object"),
        (b"[1,2]".to_vec(), "not a JSON object"),
        (b"garbage".to_vec(), "not a JSON object"),
        (
            br#"{"type":"cpu","seq":1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
            "version",
        ),
        (br#"{"v":"2","type":"cpu"}"#.to_vec(), "version"),
        (
            br#"{"v":1,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
            "unsupported protocol version 1",
        ),
        (br#"{"v":2,"type":"mem","seq":1}"#.to_vec(), "bad frame"),
        (
            br#"{"v":2,"seq":1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
            "bad frame",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":-1,"ts_ms":1,"busy_pct":1,"cores":1}"#.to_vec(),
            "bad frame",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":"high","cores":1}"#.to_vec(),
            "bad frame",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"cores":1}"#.to_vec(),
            "bad frame",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":-0.1,"cores":1}"#.to_vec(),
            "busy_pct -0.1",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":100.01,"cores":1}"#.to_vec(),
            "busy_pct 100.01",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":1e999,"cores":1}"#.to_vec(),
            "not a JSON object",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":NaN,"cores":1}"#.to_vec(),
            "not a JSON object",
        ),
        (
            br#"{"v":2,"type":"cpu","seq":1,"ts_ms":1,"busy_pct":5,"cores":0}"#.to_vec(),
            "cores",
        ),
        (
            br#"{"v":2,"type":"hello","node":"","boot":1,"interval_ms":1000,"buffer":1}"#.to_vec(),
            "hello: node",
        ),
        (
            b"{\"v\":2,\"type\":\"hello\",\"node\":\"a\\nb\",\"boot\":1,\"interval_ms\":1000,\"buffer\":1}"
                .to_vec(),
            "hello: node",
        ),
        (hello_with(r#","instance_id":"i 1""#), "instance_id"),
        (
            br#"{"v":2,"type":"hello","boot":1,"interval_ms":1000,"buffer":1}"#.to_vec(),
            "bad frame",
        ),
        (
            br#"{"v":2,"type":"hello","node":"a","boot":1,"interval_ms":10,"buffer":1}"#.to_vec(),
            "interval_ms",
        ),
        (
            br#"{"v":2,"type":"hello","node":"a","boot":1,"interval_ms":1000,"buffer":100001}"#
                .to_vec(),
            "buffer",
        ),
        (
            br#"{"v":2,"type":"hello","node":"a","boot":1,"interval_ms":1000,"buffer":1,"nonce":"zz"}"#
                .to_vec(),
            "nonce",
        ),
    ];
    for (line, want) in cases {
        let e = decode(&line).unwrap_err().to_string();
        assert!(
            e.contains(want),
            "{:?}: {e}",
            String::from_utf8_lossy(&line)
        );
    }
    assert!(decode(&hello_with("")).is_ok());
}

#[test]
fn a_channel_needs_one_hello_first_and_no_masters_frames() {
    let (mut m, challenge) = MasterChannel::open("tcp:9700");
    let cpu = encode(&Frame::Cpu(sample(1, 5.0, 0)));
    assert_eq!(
        m.accept(cpu.trim_end().as_bytes(), &[KEY], 0),
        Err(DecodeError::NoHello)
    );
    assert_eq!(
        m.accept(challenge.trim_end().as_bytes(), &[KEY], 0),
        Err(DecodeError::MastersFrame("challenge"))
    );
    let (_, line) =
        AgentChannel::answer(challenge.trim_end().as_bytes(), "tcp:9700", hello(), KEY).unwrap();
    assert!(m.accept(line.trim_end().as_bytes(), &[KEY], 0).is_ok());
    assert_eq!(
        m.accept(line.trim_end().as_bytes(), &[KEY], 0),
        Err(DecodeError::RepeatedHello)
    );
}

#[test]
fn duplicate_out_of_order_and_impossible_samples() {
    let h = hello(); // interval 1 s, buffer 5, up for an hour
    let mut f = SeqFilter::default();
    assert_eq!(f.check(&h, 5, 0), Ok(SeqVerdict::New { gap: 0 }));
    assert_eq!(f.check(&h, 6, 1000), Ok(SeqVerdict::New { gap: 0 }));
    assert_eq!(f.check(&h, 6, 1000), Ok(SeqVerdict::Old), "duplicate");
    assert_eq!(f.check(&h, 3, 1000), Ok(SeqVerdict::Old), "out of order");
    assert_eq!(f.check(&h, 10, 2000), Ok(SeqVerdict::New { gap: 3 }));
    // A seq near u64::MAX would make every later real sample look old: refused.
    assert!(matches!(
        f.check(&h, u64::MAX - 1, 3000),
        Err(DecodeError::SeqJump { .. })
    ));
    assert_eq!(f.check(&h, 11, 3000), Ok(SeqVerdict::New { gap: 0 }));
    // After a long silence (the master away for an hour) the agent is far ahead: allowed.
    assert_eq!(
        f.check(&h, 11 + 3600, 3_603_000),
        Ok(SeqVerdict::New { gap: 3599 })
    );
    // The agent restarted: its count starts again.
    let h2 = Hello {
        boot: 43,
        ..hello()
    };
    assert_eq!(f.check(&h2, 0, 0), Ok(SeqVerdict::New { gap: 0 }));
    assert_eq!(f.check(&h2, 1, 1000), Ok(SeqVerdict::New { gap: 0 }));
    assert_eq!(f.check(&h2, 0, 1000), Ok(SeqVerdict::Old));
    // The first seq heard of a run: no further than the machine's uptime allows.
    let mut f = SeqFilter::default();
    assert!(matches!(
        f.check(&hello(), 100_000, 0),
        Err(DecodeError::SeqJump { .. })
    ));
    assert!(
        f.check(&hello(), 7_000, 0).is_ok(),
        "an hour at 1 s, doubled"
    );
}

#[test]
fn line_buffer_splits_and_limits() {
    let mut b = LineBuffer::default();
    assert_eq!(b.push(b"ab").unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(b.pending(), 2);
    assert_eq!(
        b.push(b"c\nde\n\nf").unwrap(),
        vec![b"abc".to_vec(), b"de".to_vec(), b"".to_vec()]
    );
    assert_eq!(b.pending(), 1);
    let mut b = LineBuffer::default();
    assert_eq!(b.push(&vec![b'x'; MAX_LINE]).unwrap().len(), 0);
    assert_eq!(
        b.push(b"x"),
        Err(DecodeError::TooLong),
        "refused before the newline arrives"
    );
    let mut b = LineBuffer::default();
    let mut exact = vec![b'y'; MAX_LINE];
    exact.push(b'\n');
    assert_eq!(b.push(&exact).unwrap().len(), 1);
    let mut b = LineBuffer::default();
    let mut over = vec![b'y'; MAX_LINE + 1];
    over.push(b'\n');
    assert_eq!(
        b.push(&over),
        Err(DecodeError::TooLong),
        "whole in one read"
    );
}

/// Random byte soup and random mutations of valid frames never panic the master's side, and
/// a mutated frame never passes as the agent's.
#[test]
fn the_master_survives_arbitrary_input() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (_, a) = pair("tcp:9700", "tcp:9700");
    let good = a.sample(&sample(3, 12.5, 0)).into_bytes();
    for i in 0..20_000 {
        let (mut m, challenge) = MasterChannel::open("tcp:9700");
        let (_, hello_line) =
            AgentChannel::answer(challenge.trim_end().as_bytes(), "tcp:9700", hello(), KEY)
                .unwrap();
        let mut line: Vec<u8> = match i % 3 {
            0 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
            1 => hello_line.clone().into_bytes(),
            _ => good.clone(),
        };
        let original = line.clone();
        for _ in 0..rng.random_range(0..4) {
            if line.is_empty() {
                break;
            }
            let at = rng.random_range(0..line.len());
            line[at] = rng.random();
        }
        let mutated = line != original;
        let mut lb = LineBuffer::default();
        let _ = lb.each(&line, |l| {
            let r = m.accept(l, &[KEY], 0);
            // A mutated hello never proves the secret.
            if mutated && i % 3 == 1 {
                assert!(
                    !matches!(r, Ok(Event::Hello { .. })),
                    "{:?}",
                    String::from_utf8_lossy(l)
                );
            }
            r.map(|_| ())
        });
        let _ = decode(&line);
    }
}
