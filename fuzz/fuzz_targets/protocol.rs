//! The JSON protocol parser on arbitrary text: it must answer, never panic, and never return
//! more than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipeline::protocol::{ClientMessage, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Ok(ClientMessage::Audio { content, .. }) => assert!(content.len() <= text.len()),
        Ok(_) => {}
        Err(error) => {
            let session = error.to_session_error();
            assert!((1000..=1015).contains(&session.close_code));
        }
    }
});
