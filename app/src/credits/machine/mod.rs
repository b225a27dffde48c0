//! The browser client's connection logic as a pure state machine: inputs (a transport
//! opened, ended, a timer fired, the network came back) go in, commands (open this, wake me
//! then) come out. No sockets, no timers, no randomness of its own, so every rule is unit
//! tested without a browser; `browser.rs` executes the commands.
//!
//! Order: WebSocket (must open within a timeout), else SSE, else polling. Reconnects back off
//! exponentially with full jitter. On SSE or polling it periodically probes WebSocket and
//! climbs back. Close codes are acted on as `wire::close::advice` says.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::close::{self, Advice};

/// A way of receiving balance events, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    WebSocket,
    Sse,
    Polling,
}

impl Transport {
    /// The label shown in the UI and used by tests.
    pub fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Sse => "sse",
            Self::Polling => "polling",
        }
    }

    /// The fallback when this transport cannot connect.
    fn fallback(self) -> Option<Self> {
        match self {
            Self::WebSocket => Some(Self::Sse),
            Self::Sse => Some(Self::Polling),
            Self::Polling => None,
        }
    }
}

/// What the user sees of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Connecting,
    Live,
    Reconnecting,
    Offline,
    SignedOut,
    /// The server forbids this origin or credential (close 4003): nothing is retried until
    /// a new sign-in or a debug-page mode change.
    Forbidden,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Live => "live",
            Self::Reconnecting => "reconnecting",
            Self::Offline => "offline",
            Self::SignedOut => "signed out",
            Self::Forbidden => "forbidden",
        }
    }
}

/// Which transports the machine may use: all in order, one only (debug page), or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Auto,
    Only(Transport),
    Off,
}

/// Timings of the machine; the defaults suit production, tests shorten them.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// A transport that has not opened after this long counts as failed.
    pub open_timeout: Duration,
    /// First reconnect delay bound; doubles per attempt.
    pub backoff_base: Duration,
    /// Largest reconnect delay bound.
    pub backoff_cap: Duration,
    /// How often a client on SSE or polling tries WebSocket again.
    pub climb_interval: Duration,
    /// Bound of the jittered delay before reconnecting after a server restart (1012).
    pub restart_jitter: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            open_timeout: Duration::from_secs(4),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            climb_interval: Duration::from_secs(30),
            restart_jitter: Duration::from_secs(3),
        }
    }
}

/// How a transport ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Could not connect at all (refused, blocked, error before opening).
    Refused,
    /// Was open, then dropped without a close code.
    Dropped,
    /// The server closed it with a WebSocket close code; see [`close::advice`].
    Code(u16),
    /// SSE's `auth_expired` event (or a 401 from a poll).
    AuthExpired,
}

/// Something that happened. `attempt` ties transport and timer inputs to the connection
/// attempt that caused them, so late inputs from an abandoned attempt are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Signed in: start connecting.
    Start,
    /// Signed out: close everything.
    Stop,
    Opened {
        attempt: u64,
    },
    Ended {
        attempt: u64,
        ending: Ending,
    },
    OpenTimedOut {
        attempt: u64,
    },
    RetryDue {
        attempt: u64,
    },
    ClimbDue {
        attempt: u64,
    },
    ProbeOpened {
        attempt: u64,
    },
    ProbeFailed {
        attempt: u64,
    },
    /// The browser's `online` event.
    Online,
    /// The browser's `offline` event.
    NetworkLost,
    /// A debug-page button.
    SetMode(Mode),
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Close every open transport and probe.
    CloseAll,
    /// Open `transport`, reporting as `attempt`.
    Open { transport: Transport, attempt: u64 },
    /// Deliver `input` after `after`.
    Wake { after: Duration, input: Input },
    /// Try to open a WebSocket on the side, reporting `ProbeOpened`/`ProbeFailed`.
    Probe { attempt: u64 },
    /// The token expired: sign in again if possible (dev mode), else stay signed out.
    Reauthenticate,
    /// The server refused this origin or credential: tell the user that the live balance
    /// stops here, since retrying from this page cannot succeed.
    GiveUp,
}

/// The connection state of one browser tab.
#[derive(Clone, Debug)]
pub struct Machine {
    tuning: Tuning,
    mode: Mode,
    status: Status,
    /// The transport being tried or in use.
    candidate: Transport,
    open: bool,
    attempt: u64,
    /// Consecutive failed reconnects, for backoff; reset once a transport opens.
    failures: u32,
    last_version: i64,
}

impl Machine {
    pub fn new(tuning: Tuning) -> Self {
        Self {
            tuning,
            mode: Mode::Auto,
            status: Status::SignedOut,
            candidate: Transport::WebSocket,
            open: false,
            attempt: 0,
            failures: 0,
            last_version: -1,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// The transport in use, once one is open.
    pub fn transport(&self) -> Option<Transport> {
        self.open.then_some(self.candidate)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Consecutive failed reconnect attempts.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether an event of `version` should be applied: only versions newer than the last
    /// applied one are.
    pub fn accept(&mut self, version: i64) -> bool {
        if version > self.last_version {
            self.last_version = version;
            true
        } else {
            false
        }
    }

    /// The exponential backoff bound for the current failure count.
    pub fn backoff_bound(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.failures.min(16));
        self.tuning
            .backoff_base
            .saturating_mul(factor)
            .min(self.tuning.backoff_cap)
    }

    /// Advances the machine. `random` is a uniform number in `[0, 1)` used for jitter.
    pub fn step(&mut self, input: Input, random: f64) -> Vec<Command> {
        match input {
            Input::Start => self.restart(),
            Input::Stop => {
                self.status = Status::SignedOut;
                self.abandon()
            }
            Input::SetMode(mode) => {
                self.mode = mode;
                self.failures = 0;
                self.status = Status::Connecting;
                if mode == Mode::Off {
                    self.status = Status::Offline;
                    return self.abandon();
                }
                self.restart()
            }
            Input::Online if matches!(self.status, Status::Reconnecting | Status::Offline) => {
                if self.mode == Mode::Off {
                    return Vec::new();
                }
                self.failures = 0;
                self.restart()
            }
            Input::NetworkLost
                if !matches!(self.status, Status::SignedOut | Status::Forbidden)
                    && self.mode != Mode::Off =>
            {
                self.status = Status::Offline;
                Vec::new()
            }
            Input::Opened { attempt } if attempt == self.attempt && !self.open => self.opened(),
            Input::OpenTimedOut { attempt } if attempt == self.attempt && !self.open => {
                self.failed(random)
            }
            Input::Ended { attempt, ending } if attempt == self.attempt => {
                self.ended(ending, random)
            }
            Input::RetryDue { attempt } if attempt == self.attempt => self.restart(),
            Input::ClimbDue { attempt } if attempt == self.attempt && self.can_climb() => {
                vec![Command::Probe { attempt }]
            }
            Input::ProbeOpened { attempt } if attempt == self.attempt && self.can_climb() => {
                self.restart()
            }
            Input::ProbeFailed { attempt } if attempt == self.attempt && self.can_climb() => {
                vec![self.wake(self.tuning.climb_interval, Input::ClimbDue { attempt })]
            }
            _ => Vec::new(),
        }
    }

    fn can_climb(&self) -> bool {
        self.mode == Mode::Auto && self.open && self.candidate != Transport::WebSocket
    }

    fn first_transport(&self) -> Transport {
        match self.mode {
            Mode::Only(transport) => transport,
            Mode::Auto | Mode::Off => Transport::WebSocket,
        }
    }

    /// Closes everything and starts a new attempt at the top of the order.
    fn restart(&mut self) -> Vec<Command> {
        let mut commands = self.abandon();
        self.candidate = self.first_transport();
        self.status = if self.failures == 0 && self.status != Status::Reconnecting {
            Status::Connecting
        } else {
            Status::Reconnecting
        };
        commands.extend(self.open_candidate());
        commands
    }

    /// Invalidates the current attempt and closes its transports.
    fn abandon(&mut self) -> Vec<Command> {
        self.attempt += 1;
        self.open = false;
        vec![Command::CloseAll]
    }

    fn open_candidate(&mut self) -> Vec<Command> {
        let attempt = self.attempt;
        vec![
            Command::Open {
                transport: self.candidate,
                attempt,
            },
            self.wake(self.tuning.open_timeout, Input::OpenTimedOut { attempt }),
        ]
    }

    fn opened(&mut self) -> Vec<Command> {
        self.open = true;
        self.status = Status::Live;
        self.failures = 0;
        if self.can_climb() {
            let attempt = self.attempt;
            return vec![self.wake(self.tuning.climb_interval, Input::ClimbDue { attempt })];
        }
        Vec::new()
    }

    /// The candidate could not connect: fall back (automatic mode), or back off.
    fn failed(&mut self, random: f64) -> Vec<Command> {
        let fallback = match self.mode {
            Mode::Auto => self.candidate.fallback(),
            Mode::Only(_) | Mode::Off => None,
        };
        match fallback {
            Some(next) => {
                let mut commands = self.abandon();
                self.candidate = next;
                commands.extend(self.open_candidate());
                commands
            }
            None => {
                let delay = self.backoff_bound().mul_f64(random);
                self.back_off(delay)
            }
        }
    }

    fn ended(&mut self, ending: Ending, random: f64) -> Vec<Command> {
        let advice = match ending {
            Ending::Code(code) => close::advice(code),
            Ending::AuthExpired => Advice::SignIn,
            Ending::Refused | Ending::Dropped => Advice::BackOff,
        };
        match advice {
            Advice::SignIn => self.halt(Status::SignedOut, Command::Reauthenticate),
            Advice::Stop => self.halt(Status::Forbidden, Command::GiveUp),
            Advice::Reconnect => {
                let delay = self.tuning.restart_jitter.mul_f64(random);
                self.back_off(delay)
            }
            Advice::SlowDown => {
                // Back off harder than for a plain failure: the server asked us to.
                self.failures += 2;
                let delay = self.backoff_bound().mul_f64(random);
                self.back_off(delay)
            }
            // The machine only listens, so after 1008 or 1009 it has no frame to stop
            // resending; it reconnects like after any failure, and the backoff keeps a
            // misbehaving server or proxy from turning that into a tight loop.
            Advice::BackOff | Advice::FixClient if !self.open => self.failed(random),
            Advice::BackOff | Advice::FixClient => {
                let delay = self.backoff_bound().mul_f64(random);
                self.back_off(delay)
            }
        }
    }

    /// Closes everything, retries nothing, and leaves `status` until the next `Start` or
    /// mode change.
    fn halt(&mut self, status: Status, command: Command) -> Vec<Command> {
        self.status = status;
        let mut commands = self.abandon();
        commands.push(command);
        commands
    }

    /// Closes everything and schedules the next attempt after `delay`.
    fn back_off(&mut self, delay: Duration) -> Vec<Command> {
        self.failures += 1;
        self.status = Status::Reconnecting;
        let mut commands = self.abandon();
        let attempt = self.attempt;
        commands.push(self.wake(delay, Input::RetryDue { attempt }));
        commands
    }

    fn wake(&self, after: Duration, input: Input) -> Command {
        Command::Wake { after, input }
    }
}

#[cfg(test)]
mod tests;
