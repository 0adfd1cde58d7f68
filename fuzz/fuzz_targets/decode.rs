//! Every decoder on arbitrary bytes. The first byte picks the format and whether the rest is a
//! binary frame or base64 text; the rest is split into up to four messages, so decoder state
//! (Opus) carries across them.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pipeline::audio::PayloadData;
use pipeline::{AudioFormat, Encoding, Payload, Processor};
use stages::decode::Decode;

const ENCODINGS: [Encoding; 5] = [
    Encoding::Linear16,
    Encoding::Opus,
    Encoding::Mulaw,
    Encoding::Alaw,
    Encoding::Float32,
];
const RATES: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = AudioFormat {
        encoding: ENCODINGS[usize::from(selector) % 5],
        sample_rate_hz: RATES[usize::from(selector / 5) % 5],
        channels: 1 + u16::from(selector & 0x80 != 0),
    };
    let base64 = selector & 0x40 != 0;
    let mut decode = Decode::new(format).expect("every listed format is supported");
    let mut out = Vec::new();
    for chunk in rest.chunks(rest.len().div_ceil(4).max(1)) {
        let bytes = Bytes::copy_from_slice(chunk);
        let data = if base64 {
            PayloadData::Base64(bytes)
        } else {
            PayloadData::Binary(bytes)
        };
        out.clear();
        if decode
            .process(Payload { data, audio_us: 0 }, &mut out)
            .is_ok()
        {
            let samples: usize = out.iter().map(|f| f.samples.len()).sum();
            // 5760 samples: the longest Opus packet (120 ms at 48 kHz).
            assert!(samples <= chunk.len().max(5_760));
        }
    }
});
