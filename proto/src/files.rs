//! Reading the files people hand to the product (experiment files, agent
//! and coordinator configs) with bounds: a size limit, UTF-8 checked with
//! the byte offset and line of the first bad byte, and a YAML document
//! whose aliases cannot expand it past [`MAX_EXPANDED_BYTES`] (one large
//! string aliased thousands of times, or nested aliases, would otherwise
//! make a parser allocate gigabytes). Then serde parses it ([`from_yaml`]),
//! with errors that say where and quote the bad value in part only.

use std::{collections::HashMap, io::Read, path::Path};

use yaml_rust2::parser::{Event, Parser};

/// Largest file read (1 MiB): the biggest shipped experiment is a few kB.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most text a YAML document may hold once its aliases are expanded.
pub const MAX_EXPANDED_BYTES: usize = 4 << 20;
/// Most nodes (scalars, lists, maps) a YAML document may hold, aliases expanded.
pub const MAX_NODES: usize = 200_000;

/// Read `path` as UTF-8 text of at most [`MAX_FILE_BYTES`]. Errors start
/// with the path.
pub fn read_text(path: &Path) -> Result<String, String> {
    let name = path.display();
    let f = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("{name}: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{name}: larger than {MAX_FILE_BYTES} bytes (1 MiB): not a file this product reads"));
    }
    utf8(&name.to_string(), bytes)
}

/// `bytes` as UTF-8, or an error naming the byte offset, line and column of the first bad byte.
pub fn utf8(name: &str, bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let good = &e.as_bytes()[..at];
        let line = good.iter().filter(|b| **b == b'\n').count() + 1;
        let col = at - good.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1) + 1;
        format!("{name}:{line}:{col}: not UTF-8 text (invalid byte 0x{:02x} at byte offset {at})", e.as_bytes()[at])
    })
}

/// Refuse a YAML text whose aliases expand it past [`MAX_EXPANDED_BYTES`]
/// or [`MAX_NODES`]; `name` starts the message (`name:LINE:COL: …`).
pub fn check_yaml(name: &str, text: &str) -> Result<(), String> {
    let mut parser = Parser::new_from_str(text);
    // Expanded size of each anchored node: (bytes, nodes).
    let mut anchors: HashMap<usize, (usize, usize)> = HashMap::new();
    // Open collections: (anchor id, bytes and nodes counted when it opened).
    let mut open: Vec<(usize, usize, usize)> = Vec::new();
    let (mut bytes, mut nodes) = (0usize, 0usize);
    loop {
        let (event, mark) = parser.next_token().map_err(|e| {
            let m = e.marker();
            format!("{name}:{}:{}: {}", m.line(), m.col() + 1, e.info())
        })?;
        match event {
            Event::StreamEnd => return Ok(()),
            Event::Scalar(s, _, anchor, _) => {
                bytes = bytes.saturating_add(s.len());
                nodes = nodes.saturating_add(1);
                if anchor > 0 {
                    anchors.insert(anchor, (s.len(), 1));
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                nodes = nodes.saturating_add(1);
                open.push((anchor, bytes, nodes - 1));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, b0, n0)) = open.pop()
                    && anchor > 0
                {
                    anchors.insert(anchor, (bytes - b0, nodes - n0));
                }
            }
            Event::Alias(id) => {
                let (b, n) = anchors.get(&id).copied().unwrap_or((0, 1));
                bytes = bytes.saturating_add(b);
                nodes = nodes.saturating_add(n);
            }
            _ => {}
        }
        if bytes > MAX_EXPANDED_BYTES || nodes > MAX_NODES {
            return Err(format!(
                "{name}:{}:{}: its aliases expand the document past {} bytes or {MAX_NODES} nodes (an alias bomb?): refused",
                mark.line(),
                mark.col() + 1,
                MAX_EXPANDED_BYTES
            ));
        }
    }
}

/// Parse YAML `text` (from `name`) into `T` after [`check_yaml`]; the
/// error reads `name:LINE:COL: message`, as compilers write it, with
/// serde's quote of the bad value cut to 600 bytes.
pub fn from_yaml<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> Result<T, String> {
    check_yaml(name, text)?;
    serde_yaml_ng::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(m, _)| m).to_string();
        let msg = if msg.len() > 600 { format!("{}… ({} bytes)", crate::edge::one_line(&msg, 600), msg.len()) } else { msg };
        match e.location() {
            Some(l) => format!("{name}:{}:{}: {msg}", l.line(), l.column()),
            None => format!("{name}: {msg}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alias_bomb_is_refused_before_serde_sees_it() {
        // One 100 kB string aliased 100 times: 10 MB once expanded.
        let mut text = format!("big: &a \"{}\"\nlist:\n", "x".repeat(100_000));
        for _ in 0..100 {
            text.push_str("  - *a\n");
        }
        let e = check_yaml("bomb.yaml", &text).expect_err("bomb");
        assert!(e.starts_with("bomb.yaml:") && e.contains("alias bomb"), "{e}");
        // Nested: each level doubles (a billion laughs).
        let mut nested = "l0: &l0 [\"lol\", \"lol\"]\n".to_string();
        for i in 1..40 {
            nested.push_str(&format!("l{i}: &l{i} [*l{}, *l{}]\n", i - 1, i - 1));
        }
        assert!(check_yaml("laughs.yaml", &nested).expect_err("laughs").contains("alias bomb"));
        // Aliases used as people use them pass.
        check_yaml("ok.yaml", "base: &b {duration: 10s}\nsteps:\n  - <<: *b\n  - *b\n").expect("ordinary aliases");
    }

    #[test]
    fn invalid_utf8_is_refused_with_offset_line_and_column() {
        let e = utf8("f.yaml", b"name: ok\nkey: caf\xe9\n".to_vec()).expect_err("latin-1");
        assert_eq!(e, "f.yaml:2:9: not UTF-8 text (invalid byte 0xe9 at byte offset 17)");
    }

    #[test]
    fn files_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("big.yaml");
        std::fs::write(&p, vec![b'#'; MAX_FILE_BYTES as usize + 1]).expect("write");
        assert!(read_text(&p).expect_err("big").contains("larger than"));
        std::fs::write(&p, "a: 1\n").expect("write");
        let text = read_text(&p).expect("small");
        let v: std::collections::BTreeMap<String, u32> = from_yaml("small.yaml", &text).expect("parse");
        assert_eq!(v["a"], 1);
        let e = from_yaml::<std::collections::BTreeMap<String, u32>>("big.yaml", &format!("a: \"{}\"\n", "v".repeat(100_000)))
            .expect_err("type");
        assert!(e.starts_with("big.yaml:1:") && e.len() < 700, "{e}");
    }
}
