//! `palisadectl`: compile, explain and verify Palisade policies.

mod cli;
mod compile;
mod controller;
mod dataplane;
mod demo;
mod demo_api;
mod explain;
mod file_edits;
mod flows;
mod inputs;
mod prometheus;
mod running;
mod status;
mod verify;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match cli::Cli::parse().run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
