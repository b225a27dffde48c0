use super::*;

fn tuning() -> Tuning {
    Tuning {
        open_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(5),
        climb_interval: Duration::from_secs(30),
        restart_jitter: Duration::from_secs(1),
    }
}

fn started() -> Machine {
    let mut machine = Machine::new(tuning());
    machine.step(Input::Start, 0.5);
    machine
}

fn opened_transport(commands: &[Command]) -> Option<Transport> {
    commands.iter().find_map(|c| match c {
        Command::Open { transport, .. } => Some(*transport),
        _ => None,
    })
}

fn wake_delay(commands: &[Command]) -> Option<Duration> {
    commands.iter().find_map(|c| match c {
        Command::Wake {
            after,
            input: Input::RetryDue { .. },
        } => Some(*after),
        _ => None,
    })
}

/// Fails the current candidate by letting its open timeout fire.
fn time_out(machine: &mut Machine) -> Vec<Command> {
    let attempt = machine.attempt;
    machine.step(Input::OpenTimedOut { attempt }, 0.5)
}

/// Starting opens a WebSocket with an open timeout.
#[test]
fn starts_with_websocket() {
    let mut machine = Machine::new(tuning());
    let commands = machine.step(Input::Start, 0.5);
    assert_eq!(opened_transport(&commands), Some(Transport::WebSocket));
    assert!(commands.iter().any(|c| matches!(
        c,
        Command::Wake { after, input: Input::OpenTimedOut { .. } } if *after == Duration::from_secs(2)
    )));
    assert_eq!(machine.status(), Status::Connecting);
    assert_eq!(machine.transport(), None);
}

/// WebSocket → SSE → polling, then a backoff before starting over at WebSocket.
#[test]
fn falls_back_in_order_then_backs_off() {
    let mut machine = started();
    assert_eq!(
        opened_transport(&time_out(&mut machine)),
        Some(Transport::Sse)
    );
    let attempt = machine.attempt;
    let refused = machine.step(
        Input::Ended {
            attempt,
            ending: Ending::Refused,
        },
        0.5,
    );
    assert_eq!(opened_transport(&refused), Some(Transport::Polling));
    let exhausted = time_out(&mut machine);
    assert_eq!(opened_transport(&exhausted), None);
    assert!(wake_delay(&exhausted).is_some());
    assert_eq!(machine.status(), Status::Reconnecting);
    let attempt = machine.attempt;
    let retry = machine.step(Input::RetryDue { attempt }, 0.5);
    assert_eq!(opened_transport(&retry), Some(Transport::WebSocket));
}

/// Opening makes the connection live and resets the failure count.
#[test]
fn opening_goes_live() {
    let mut machine = started();
    let attempt = machine.attempt;
    machine.step(Input::Opened { attempt }, 0.5);
    assert_eq!(machine.status(), Status::Live);
    assert_eq!(machine.transport(), Some(Transport::WebSocket));
    assert_eq!(machine.failures(), 0);
}

/// Reconnect delays are full-jitter: uniform in [0, min(cap, base × 2^n)] after n failures.
#[test]
fn backoff_is_bounded_full_jitter() {
    let mut machine = Machine::new(tuning());
    machine.step(Input::SetMode(Mode::Only(Transport::WebSocket)), 0.5);
    for failures in 0..10_u32 {
        let bound = machine.backoff_bound();
        let expected =
            (Duration::from_millis(100) * 2u32.pow(failures)).min(Duration::from_secs(5));
        assert_eq!(bound, expected, "after {failures} failures");
        let attempt = machine.attempt;
        let low = machine.clone().step(Input::OpenTimedOut { attempt }, 0.0);
        assert_eq!(wake_delay(&low), Some(Duration::ZERO));
        let high = machine.step(Input::OpenTimedOut { attempt }, 0.999);
        let high = wake_delay(&high).expect("a retry");
        assert!(
            high <= bound && high >= bound.mul_f64(0.99),
            "{high:?} vs {bound:?}"
        );
        let attempt = machine.attempt;
        machine.step(Input::RetryDue { attempt }, 0.5);
    }
}

/// On SSE or polling it probes WebSocket periodically and climbs back when it opens.
#[test]
fn climbs_back_to_websocket() {
    let mut machine = started();
    time_out(&mut machine);
    let attempt = machine.attempt;
    let live = machine.step(Input::Opened { attempt }, 0.5);
    assert_eq!(machine.transport(), Some(Transport::Sse));
    assert!(live.contains(&Command::Wake {
        after: Duration::from_secs(30),
        input: Input::ClimbDue { attempt }
    }));
    assert_eq!(
        machine.step(Input::ClimbDue { attempt }, 0.5),
        [Command::Probe { attempt }]
    );
    let failed = machine.step(Input::ProbeFailed { attempt }, 0.5);
    assert!(matches!(
        failed[..],
        [Command::Wake {
            input: Input::ClimbDue { .. },
            ..
        }]
    ));
    assert_eq!(machine.transport(), Some(Transport::Sse), "still on SSE");
    let climbed = machine.step(Input::ProbeOpened { attempt }, 0.5);
    assert_eq!(climbed[0], Command::CloseAll);
    assert_eq!(opened_transport(&climbed), Some(Transport::WebSocket));
}

/// Events not newer than the last applied one are ignored.
#[test]
fn stale_versions_are_ignored() {
    let mut machine = started();
    assert!(machine.accept(0));
    assert!(machine.accept(3));
    assert!(!machine.accept(3));
    assert!(!machine.accept(2));
    assert!(machine.accept(4));
}

/// Token expiry (4001 or SSE `auth_expired`) signs out and asks to re-authenticate instead
/// of retrying.
#[test]
fn expiry_signs_out() {
    for ending in [Ending::Code(close::TOKEN_EXPIRED), Ending::AuthExpired] {
        let mut machine = started();
        let attempt = machine.attempt;
        machine.step(Input::Opened { attempt }, 0.5);
        let commands = machine.step(Input::Ended { attempt, ending }, 0.5);
        assert_eq!(machine.status(), Status::SignedOut);
        assert!(commands.contains(&Command::Reauthenticate));
        assert_eq!(wake_delay(&commands), None, "no retry loop");
    }
}

/// A server restart (1012) reconnects after a jittered delay; 4029 backs off harder.
#[test]
fn restart_and_too_many() {
    let mut machine = started();
    let attempt = machine.attempt;
    machine.step(Input::Opened { attempt }, 0.5);
    let restart = machine.step(
        Input::Ended {
            attempt,
            ending: Ending::Code(close::RESTARTING),
        },
        0.5,
    );
    assert_eq!(wake_delay(&restart), Some(Duration::from_millis(500)));

    let mut machine = started();
    let attempt = machine.attempt;
    machine.step(Input::Opened { attempt }, 0.5);
    let too_many = machine.step(
        Input::Ended {
            attempt,
            ending: Ending::Code(close::TOO_MANY_CONNECTIONS),
        },
        0.999,
    );
    assert!(wake_delay(&too_many).expect("retry") >= Duration::from_millis(390));
}

/// Inputs from an abandoned attempt change nothing.
#[test]
fn late_inputs_are_ignored() {
    let mut machine = started();
    let old = machine.attempt;
    time_out(&mut machine);
    assert!(machine.step(Input::Opened { attempt: old }, 0.5).is_empty());
    assert_eq!(machine.status(), Status::Connecting);
}

/// The browser coming back online reconnects at once, without waiting for the backoff.
#[test]
fn online_reconnects_at_once() {
    let mut machine = started();
    let attempt = machine.attempt;
    machine.step(Input::Opened { attempt }, 0.5);
    machine.step(
        Input::Ended {
            attempt,
            ending: Ending::Dropped,
        },
        0.5,
    );
    machine.step(Input::NetworkLost, 0.5);
    assert_eq!(machine.status(), Status::Offline);
    let commands = machine.step(Input::Online, 0.5);
    assert_eq!(opened_transport(&commands), Some(Transport::WebSocket));
}

/// Debug modes: one transport only (no fallback), or everything off.
#[test]
fn forced_modes() {
    let mut machine = started();
    let commands = machine.step(Input::SetMode(Mode::Only(Transport::Polling)), 0.5);
    assert_eq!(opened_transport(&commands), Some(Transport::Polling));
    let failed = time_out(&mut machine);
    assert_eq!(opened_transport(&failed), None, "no fallback when forced");
    assert!(wake_delay(&failed).is_some());
    let attempt = machine.attempt;
    let retry = machine.step(Input::RetryDue { attempt }, 0.5);
    assert_eq!(opened_transport(&retry), Some(Transport::Polling));

    let off = machine.step(Input::SetMode(Mode::Off), 0.5);
    assert_eq!(off, [Command::CloseAll]);
    assert_eq!(machine.status(), Status::Offline);
    assert!(machine.step(Input::Online, 0.5).is_empty());
}

/// A live machine whose connection the server has just ended with `ending`; the commands.
fn end_live(machine: &mut Machine, ending: Ending, random: f64) -> Vec<Command> {
    let attempt = machine.attempt;
    machine.step(Input::Opened { attempt }, 0.5);
    machine.step(Input::Ended { attempt, ending }, random)
}

/// A refused origin or credential (4003), before or after the snapshot, stops for good:
/// nothing is reopened or scheduled, and neither the network coming back nor a late timer
/// revives it; only a new sign-in does.
#[test]
fn forbidden_is_not_retried() {
    for opened in [false, true] {
        let mut machine = started();
        let attempt = machine.attempt;
        if opened {
            machine.step(Input::Opened { attempt }, 0.5);
        }
        let ending = Ending::Code(close::FORBIDDEN_ORIGIN);
        let commands = machine.step(Input::Ended { attempt, ending }, 0.5);
        assert_eq!(commands, [Command::CloseAll, Command::GiveUp]);
        assert_eq!(machine.status(), Status::Forbidden);
        assert_eq!(machine.transport(), None);

        assert!(machine.step(Input::NetworkLost, 0.5).is_empty());
        assert!(machine.step(Input::Online, 0.5).is_empty());
        assert!(machine.step(Input::RetryDue { attempt }, 0.5).is_empty());
        assert_eq!(machine.status(), Status::Forbidden);

        let again = machine.step(Input::Start, 0.5);
        assert_eq!(opened_transport(&again), Some(Transport::WebSocket));
    }
}

/// 1008 and 1009 say a client frame was bad. The machine sends none, so it only reconnects,
/// with a growing backoff rather than at once: repeated closes cannot become a tight loop.
#[test]
fn bad_frame_codes_back_off() {
    for code in [close::POLICY, close::TOO_BIG] {
        let mut machine = Machine::new(tuning());
        machine.step(Input::SetMode(Mode::Only(Transport::WebSocket)), 0.5);
        let mut bounds = Vec::new();
        for _ in 0..3 {
            let bound = machine.backoff_bound();
            let attempt = machine.attempt;
            let commands = machine.step(
                Input::Ended {
                    attempt,
                    ending: Ending::Code(code),
                },
                0.999,
            );
            assert_eq!(opened_transport(&commands), None, "{code}: not at once");
            let delay = wake_delay(&commands).expect("a retry");
            assert!(
                delay <= bound && delay >= bound.mul_f64(0.99),
                "{code}: {delay:?}"
            );
            bounds.push(bound);
            let attempt = machine.attempt;
            machine.step(Input::RetryDue { attempt }, 0.5);
        }
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{code}: {bounds:?}");

        let mut machine = started();
        let commands = end_live(&mut machine, Ending::Code(code), 0.5);
        assert!(wake_delay(&commands).is_some(), "{code}: reconnects later");
        assert_eq!(machine.status(), Status::Reconnecting);
    }
}

/// 1006 (dropped without a close frame) and codes this server never sends are failures that
/// may pass: after the snapshot they back off and reconnect; before it, the next transport
/// is tried.
#[test]
fn abnormal_and_unknown_codes_back_off() {
    for code in [close::ABNORMAL, 1000, 1011, 4999] {
        let mut machine = started();
        let commands = end_live(&mut machine, Ending::Code(code), 0.999);
        let delay = wake_delay(&commands).expect("a retry");
        assert!(delay <= Duration::from_millis(100), "{code}: {delay:?}");
        assert_eq!(machine.status(), Status::Reconnecting, "{code}");
        let attempt = machine.attempt;
        let retry = machine.step(Input::RetryDue { attempt }, 0.5);
        assert_eq!(
            opened_transport(&retry),
            Some(Transport::WebSocket),
            "{code}"
        );

        let mut machine = started();
        let attempt = machine.attempt;
        let ending = Ending::Code(code);
        let before_open = machine.step(Input::Ended { attempt, ending }, 0.5);
        assert_eq!(
            opened_transport(&before_open),
            Some(Transport::Sse),
            "{code}"
        );
    }
}
