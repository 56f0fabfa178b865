//! Fuzzing of our own, on stable Rust: a mutational fuzzer over a
//! committed corpus, driven by proptest (which catches a panic, shrinks the
//! input that caused it and prints it). Each target starts from the seeds
//! in `tests/fuzz/corpus/TARGET/` (and any extra seeds a caller adds),
//! applies byte-level and dictionary mutations, and hands the result to
//! the code under test, which must not panic and must keep its own
//! properties.
//!
//! Bounded: `CHAOS_FUZZ_CASES` inputs per target (default 2000), and no
//! longer than `CHAOS_FUZZ_SECONDS` (default 20 s) of work per target. A
//! failure also writes the shrunk input under
//! `target/fuzz-failures/TARGET-*` to add to the corpus once fixed.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};

/// The committed corpus of `target`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// Every file of the committed corpus of `target`, sorted by name.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .unwrap_or_else(|e| panic!("corpus of {target}: {e}"))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the byte at (position mod length).
    Set(usize, u8),
    /// Insert a dictionary token.
    Token(usize, usize),
    /// Remove up to n bytes.
    Delete(usize, usize),
    /// Repeat a slice (long values, many items).
    Repeat(usize, usize, usize),
    /// Copy a slice of another seed in.
    Splice(usize, usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Mutation::Token(p, t)),
        (any::<usize>(), 1usize..16).prop_map(|(p, n)| Mutation::Delete(p, n)),
        (any::<usize>(), 1usize..32, 2usize..200).prop_map(|(p, n, k)| Mutation::Repeat(p, n, k)),
        (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..64).prop_map(|(p, s, f, n)| Mutation::Splice(p, s, f, n)),
    ]
}

fn apply(seeds: &[Vec<u8>], dict: &[&[u8]], seed: usize, mutations: &[Mutation]) -> Vec<u8> {
    let mut out = seeds[seed % seeds.len()].clone();
    let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
    for m in mutations {
        match *m {
            Mutation::Set(p, b) if !out.is_empty() => {
                let i = p % out.len();
                out[i] = b;
            }
            Mutation::Set(..) => out.push(0),
            Mutation::Token(p, t) if !dict.is_empty() => {
                let i = at(p, out.len());
                let tok = dict[t % dict.len()];
                out.splice(i..i, tok.iter().copied());
            }
            Mutation::Token(..) => {}
            Mutation::Delete(p, n) => {
                let i = at(p, out.len());
                let end = (i + n).min(out.len());
                out.drain(i..end);
            }
            Mutation::Repeat(p, n, k) => {
                let i = at(p, out.len());
                let end = (i + n).min(out.len());
                let piece: Vec<u8> = out[i..end].to_vec();
                let copies: Vec<u8> = piece.iter().copied().cycle().take(piece.len() * k).collect();
                out.splice(end..end, copies);
            }
            Mutation::Splice(p, s, f, n) => {
                let other = &seeds[s % seeds.len()];
                let from = at(f, other.len()).min(other.len());
                let end = (from + n).min(other.len());
                let i = at(p, out.len());
                out.splice(i..i, other[from..end].iter().copied());
            }
        }
        // Bounded input: the targets have their own size limits, far below this.
        out.truncate(2 << 20);
    }
    out
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Fuzz `target`: `check` gets each input and panics (or returns `Err`)
/// when a property does not hold. `extra` seeds join the committed corpus.
pub fn fuzz(target: &str, extra: Vec<Vec<u8>>, dict: &[&[u8]], check: impl Fn(&[u8]) -> Result<(), String>) {
    let mut seeds = corpus(target);
    seeds.extend(extra);
    assert!(!seeds.is_empty(), "{target}: no seeds");
    // The seeds themselves first: each must hold the properties as is.
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = check(s) {
            panic!("{target}: seed {i} fails: {e}");
        }
    }
    let cases = env_number("CHAOS_FUZZ_CASES", 2000);
    let budget = Duration::from_secs(env_number("CHAOS_FUZZ_SECONDS", 20));
    let started = Instant::now();
    let n = seeds.len();
    let strategy = (0..n, proptest::collection::vec(mutation(), 1..8));
    let (mut done, chunk) = (0u64, 200u64);
    while done < cases && started.elapsed() < budget {
        let this = chunk.min(cases - done) as u32;
        // A fixed sequence per chunk: a run is reproducible from its chunk number.
        let config =
            Config { cases: this, failure_persistence: None, rng_seed: proptest::test_runner::RngSeed::Fixed(done), ..Config::default() };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&strategy, |(seed, mutations)| {
            let input = apply(&seeds, dict, seed, &mutations);
            check(&input)
                .map_err(|e| TestCaseError::fail(format!("{e}\ninput ({} bytes): {:?}", input.len(), String::from_utf8_lossy(&input))))
        });
        if let Err(e) = result {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(format!("{target}-{done}.txt")), e.to_string());
            panic!("fuzz target {target} failed (chunk {done}):\n{e}");
        }
        done += u64::from(this);
    }
    eprintln!("fuzz {target}: {done} inputs from {n} seeds in {:.1}s", started.elapsed().as_secs_f64());
    assert!(done > 0, "{target}: no input run within {budget:?}");
}
