//! The built `server` binary as a child process, as an operator runs it.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// The binary with a clean environment plus `vars`, run in `dir` so no `.env` is read.
pub fn command(dir: &Path, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_server"));
    command
        .env_clear()
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to its end and collects its output, as [`Command::output`] does, but
/// kills it and panics if it still runs after `limit`: a server that should have refused to
/// start must fail its test, not hang it.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command.spawn().expect("server starts");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let printed = String::from_utf8_lossy(&stdout.join().expect("stdout reader"))
                .into_owned()
                + &String::from_utf8_lossy(&stderr.join().expect("stderr reader"));
            panic!("still running after {limit:?}, so it started: {printed}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// A running server process and the address it announced.
pub struct ServerProcess {
    child: Child,
    pub addr: String,
    announced: String,
    /// Drains the rest of stdout so the server never blocks on a full pipe.
    rest: Option<JoinHandle<String>>,
}

impl ServerProcess {
    /// Starts the binary on a free port and waits for its "listening on" line.
    pub fn start(dir: &Path, vars: &[(&str, &str)]) -> Self {
        Self::try_start(dir, vars)
            .unwrap_or_else(|output| panic!("the server exited before listening: {output}"))
    }

    /// As [`ServerProcess::start`], but a server that exits before listening is an `Err`
    /// of everything it printed on stdout and stderr.
    pub fn try_start(dir: &Path, vars: &[(&str, &str)]) -> Result<Self, String> {
        let mut vars = vars.to_vec();
        vars.push(("LEPTOS_SITE_ADDR", "127.0.0.1:0"));
        let mut child = command(dir, &vars).spawn().expect("server starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut announced = String::new();
        let addr = loop {
            let mut line = String::new();
            let read = stdout.read_line(&mut line).expect("reads stdout");
            if read == 0 {
                let _ = child.wait();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = stderr.read_to_string(&mut announced);
                }
                return Err(announced);
            }
            announced.push_str(&line);
            if let Some((_, rest)) = line.split_once("listening on http://") {
                break rest.split_whitespace().next().expect("address").to_owned();
            }
        };
        let rest = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stdout.read_to_string(&mut rest);
            rest
        });
        Ok(Self {
            child,
            addr,
            announced,
            rest: Some(rest),
        })
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(status.expect("kill runs").success());
    }

    /// Waits up to `limit` for the process to exit; returns its status and everything it
    /// printed on stdout and stderr.
    pub fn wait(mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waits") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("still running {limit:?} after being told to stop");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut output = std::mem::take(&mut self.announced);
        if let Some(rest) = self.rest.take() {
            output.push_str(&rest.join().expect("stdout reader"));
        }
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut output);
        }
        (status, output)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

impl ServerProcess {
    /// Ends the process as a crash would: SIGKILL (what [`Child::kill`] sends on Unix), so no
    /// shutdown code runs, then reaps it. Returns its exit status.
    pub fn kill_hard(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL is sent");
        self.child.wait().expect("the killed process is reaped")
    }
}
