//! The end-to-end tests, one module per area, in one test binary: each test
//! binary links the whole system and its dependencies, so fourteen of them
//! took about a minute and a half more of a fresh clone's first build (and
//! a second of startup each) than one. Run one area with
//! `cargo test -p chat-tests --test e2e <area>::`, for example `faults::`.

mod changes;
mod cli;
mod deploy;
mod failover;
mod faults;
mod fuzz;
mod media;
mod messages;
mod notify;
mod rest;
mod security;
mod store;
mod tls;
mod web_client;
mod websocket;
