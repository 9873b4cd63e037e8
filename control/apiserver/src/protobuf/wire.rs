//! The protobuf wire format: varints, fixed-width values and
//! length-delimited fields, read without a schema.

/// One field's raw value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raw<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(&'a [u8]),
}

impl Raw<'_> {
    pub fn wire_type(&self) -> u8 {
        match self {
            Raw::Varint(_) => 0,
            Raw::Fixed64(_) => 1,
            Raw::Len(_) => 2,
            Raw::Fixed32(_) => 5,
        }
    }
}

/// Reads fields one after the other.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn is_done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "a field of {n} bytes runs past the end of its message ({} bytes left)",
                    self.buf.len() - self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn fixed64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn fixed32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(u32::from_le_bytes(a))
    }

    /// The next field: its number and raw value.
    pub fn field(&mut self) -> Result<(u32, Raw<'a>), String> {
        let key = self.varint()?;
        let tag = u32::try_from(key >> 3)
            .map_err(|_| format!("field number {} is out of range", key >> 3))?;
        if tag == 0 {
            return Err("field number 0 is not valid".into());
        }
        let raw = match key & 7 {
            0 => Raw::Varint(self.varint()?),
            1 => Raw::Fixed64(self.fixed64()?),
            2 => {
                let len = self.varint()?;
                let len =
                    usize::try_from(len).map_err(|_| format!("length {len} is out of range"))?;
                Raw::Len(self.take(len)?)
            }
            5 => Raw::Fixed32(self.fixed32()?),
            wt => {
                return Err(format!(
                    "field {tag} has wire type {wt}, which is not supported (groups are not used by Kubernetes)"
                ));
            }
        };
        Ok((tag, raw))
    }
}

/// All fields of a message, in order.
pub fn fields(buf: &[u8]) -> Result<Vec<(u32, Raw<'_>)>, String> {
    let mut r = Reader::new(buf);
    let mut out = Vec::new();
    while !r.is_done() {
        out.push(r.field()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_wire_type_and_rejects_truncation() {
        // 1: varint 300, 2: "hi", 3: fixed64 1, 4: fixed32 2
        let buf = [
            0x08, 0xac, 0x02, 0x12, 0x02, b'h', b'i', 0x19, 1, 0, 0, 0, 0, 0, 0, 0, 0x25, 2, 0, 0,
            0,
        ];
        let f = fields(&buf).unwrap();
        assert_eq!(
            f,
            vec![
                (1, Raw::Varint(300)),
                (2, Raw::Len(b"hi")),
                (3, Raw::Fixed64(1)),
                (4, Raw::Fixed32(2))
            ]
        );
        assert!(fields(&buf[..5]).is_err());
        assert!(fields(&[0x08]).is_err());
        assert!(fields(&[0x0b]).is_err());
        assert!(fields(&[0x00, 0x01]).is_err());
        assert!(
            fields(&[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ])
            .is_err()
        );
    }
}
