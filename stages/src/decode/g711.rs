//! G.711 μ-law and A-law expansion tables (ITU-T G.711), built at compile time.

pub static MULAW: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = mulaw(i as u8);
        i += 1;
    }
    table
};

pub static ALAW: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = alaw(i as u8);
        i += 1;
    }
    table
};

const fn mulaw(byte: u8) -> i16 {
    // Bits are stored inverted; the bias of 0x84 keeps segment 0 continuous with the others.
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = (u & 0x0f) as i32;
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

const fn alaw(byte: u8) -> i16 {
    // Even bits are inverted on the wire; a set sign bit means positive.
    let a = byte ^ 0x55;
    let exponent = (a >> 4) & 0x07;
    let mantissa = (a & 0x0f) as i32;
    let magnitude = if exponent == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (exponent - 1)
    };
    if a & 0x80 != 0 {
        magnitude as i16
    } else {
        -magnitude as i16
    }
}
