//! The control socket: how a test switches faults in a running `qslice-faultfs`.
//!
//! Contract: a unix stream socket; each request is one JSON line ([`Request`]) answered
//! by one JSON line ([`Response`]). A connection may carry any number of requests.
//! Changes take effect for operations that start after the answer. By hand:
//!
//! ```text
//! "Ping"                                             -> "Ok"
//! {"Set":{"RenameThenEnoent":{"suffix":".pck","times":1}}}
//! {"Set":{"OpenError":{"errno":"Estale","matching":{"suffix":null,"times":3}}}}
//! {"Set":{"Block":{"op":"Rename","duration":{"secs":5,"nanos":0},"matching":{"suffix":null,"times":null}}}}
//! {"Set":{"CachedListings":{"ttl":{"secs":3,"nanos":0}}}}
//! "Clear"                                            -> "Ok"
//! "Counters"                                         -> {"Counters":{"renames_then_enoent":1,...}}
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fault::{Counters, Fault, Switchboard};

/// A request to the file system.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Is it mounted and listening? Answered with [`Response::Ok`].
    Ping,
    /// Activate a fault (replacing the active one of its kind).
    Set(Fault),
    /// Deactivate every fault.
    Clear,
    /// Report the counters.
    Counters,
}

/// The answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// The counters.
    Counters(Counters),
    /// The request could not be parsed.
    Error(String),
}

fn answer(board: &Mutex<Switchboard>, line: &str) -> Response {
    let request: Request = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(e) => return Response::Error(format!("bad request {line:?}: {e}")),
    };
    let mut board = board.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match request {
        Request::Ping => Response::Ok,
        Request::Set(fault) => {
            board.set(fault);
            Response::Ok
        }
        Request::Clear => {
            board.clear();
            Response::Ok
        }
        Request::Counters => Response::Counters(board.counters()),
    }
}

fn serve_connection(stream: UnixStream, board: &Mutex<Switchboard>) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let response = answer(board, &line?);
        let mut text = serde_json::to_string(&response).map_err(io::Error::other)?;
        text.push('\n');
        writer.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Serves `listener` on a thread of its own (one more per connection), for as long as
/// the process lives.
pub fn serve(listener: UnixListener, board: Arc<Mutex<Switchboard>>) -> io::Result<()> {
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let board = Arc::clone(&board);
            let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                if let Err(e) = serve_connection(stream, &board) {
                    eprintln!("qslice-faultfs: control connection: {e}");
                }
            });
        }
    })?;
    Ok(())
}

/// How long a control request may take: the server answers at once unless the machine
/// is starved, so this only bounds a hung server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request to the socket at `path` and returns the answer.
pub fn call(path: &Path, request: &Request) -> io::Result<Response> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut text = serde_json::to_string(request).map_err(io::Error::other)?;
    text.push('\n');
    (&stream).write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "control socket closed without an answer"));
    }
    serde_json::from_str(&line).map_err(io::Error::other)
}
