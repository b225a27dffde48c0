//! The built `server` binary as a child process, as an operator runs it.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
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
        let mut vars = vars.to_vec();
        vars.push(("LEPTOS_SITE_ADDR", "127.0.0.1:0"));
        let mut child = command(dir, &vars).spawn().expect("server starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut announced = String::new();
        let addr = loop {
            let mut line = String::new();
            let read = stdout.read_line(&mut line).expect("reads stdout");
            assert!(read > 0, "the server exited before listening: {announced}");
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
        Self {
            child,
            addr,
            announced,
            rest: Some(rest),
        }
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
