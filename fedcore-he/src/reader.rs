//! A bounds-checked little-endian reader for the crate's byte formats
//! (encrypted vectors, key files).

/// A bounds-checked little-endian reader.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

/// Reading past the end.
#[derive(Debug)]
pub(crate) struct Short;

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], Short> {
        if n > self.rest.len() {
            return Err(Short);
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> std::result::Result<u8, Short> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> std::result::Result<u32, Short> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub(crate) fn u64(&mut self) -> std::result::Result<u64, Short> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// Bytes not read yet.
    pub(crate) fn rest_len(&self) -> usize {
        self.rest.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}
