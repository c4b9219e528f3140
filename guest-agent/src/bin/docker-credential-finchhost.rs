//! `docker-credential-finchhost`: the credential helper that clients in the VM execute.
//!
//! The whole protocol lives in [`finch_guest_agent::helper`]; this file wires it to the
//! process's arguments, stdin, stdout and the guest agent's socket
//! (`$FINCH_GUEST_AGENT_SOCKET`, default `/run/finch-guest-agent/helper.sock`).

use std::process::ExitCode;

use finch_guest_agent::helper::{self, client::SocketAgent};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let run = helper::run(&args, &mut std::io::stdin().lock(), &SocketAgent::from_env());
    helper::emit(&run)
}
