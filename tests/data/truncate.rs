//! Truncation modes and TRL < 1.0's prompt and completion limits on byte-tokenized pairs, where each
//! character is a token and every cut can be read off the text (TRL's own sequences are checked in
//! `conversation`).

use super::*;

fn one(pair: &PreferencePair, limits: &Truncation) -> (Option<TokenizedPair>, TruncationReport) {
    let template = Template::new("{prompt}").unwrap();
    let (mut out, report) = tokenize_pairs_with(std::slice::from_ref(pair), &ByteTokenizer, &template, limits).unwrap();
    (out.pop(), report)
}

fn text(ids: &[i32]) -> String {
    ids.iter().map(|&id| if id == ByteTokenizer::EOS { '$' } else { id as u8 as char }).collect()
}

/// prompt "0123456789" (10 tokens), chosen " abcdefghijklmn$" (16), rejected " xyz$" (5).
fn pair() -> PreferencePair {
    PreferencePair::new("0123456789", "abcdefghijklmn", "xyz")
}

fn cut(pair: &PreferencePair, limits: Truncation) -> (String, String, String) {
    let tp = one(pair, &limits).0.expect("kept");
    (text(&tp.prompt), text(&tp.chosen), text(&tp.rejected))
}

#[test]
fn trl_v0_prompt_and_completion_limits_apply_first() {
    let p = pair();
    let limits = |prompt: Option<usize>, completion: Option<usize>| Truncation {
        max_prompt_length: prompt,
        max_completion_length: completion,
        ..Truncation::new(1000)
    };
    // The prompt keeps its end, each response its start (losing its EOS).
    assert_eq!(cut(&p, limits(Some(4), None)), ("6789".into(), " abcdefghijklmn$".into(), " xyz$".into()));
    assert_eq!(cut(&p, limits(None, Some(4))), ("0123456789".into(), " abc".into(), " xyz".into()));
    assert_eq!(cut(&p, limits(Some(20), Some(5))), ("0123456789".into(), " abcd".into(), " xyz$".into()));
    let (_, report) = one(&p, &limits(Some(4), Some(4)));
    assert_eq!((report.prompts_truncated, report.responses_truncated), (1, 2));
    // Then max_len, in its mode: 4 + 8 tokens.
    let both = Truncation { max_prompt_length: Some(4), max_completion_length: Some(10), ..Truncation::new(12) };
    assert_eq!(cut(&p, both), ("6789".into(), " abcdefg".into(), " xyz$".into()));
    let (_, report) = one(&p, &both);
    assert_eq!((report.prompts_truncated, report.responses_truncated), (1, 1), "a response cut twice counts once");
}

#[test]
fn keep_start_keeps_each_sequences_start() {
    let p = pair();
    let keep_start = |max_len| Truncation { mode: TruncationMode::KeepStart, ..Truncation::new(max_len) };
    assert_eq!(cut(&p, keep_start(26)), ("0123456789".into(), " abcdefghijklmn$".into(), " xyz$".into()));
    assert_eq!(cut(&p, keep_start(14)), ("0123456789".into(), " abc".into(), " xyz".into()));
    // Room for one response token each: both become " ", identical, and the pair is dropped.
    let (out, report) = one(&p, &keep_start(11));
    assert!(out.is_none() && report.dropped_identical == 1);
    // A prompt that fills max_len is dropped (TRL's filter), even when the default would cut it.
    let (out, report) = one(&p, &keep_start(10));
    assert!(out.is_none() && report.dropped_too_long == 1);
    assert!(one(&p, &Truncation::new(10)).0.is_some());
}

#[test]
fn keep_end_keeps_each_sequences_end_with_the_prompt_shared() {
    let p = pair();
    let keep_end = |max_len| Truncation { mode: TruncationMode::KeepEnd, ..Truncation::new(max_len) };
    // The longer sequence (prompt + chosen, 26) keeps its last 20: the prompt loses 6, for both.
    assert_eq!(cut(&p, keep_end(20)), ("6789".into(), " abcdefghijklmn$".into(), " xyz$".into()));
    // A response of max_len tokens or more: the prompt's last token, the responses' last max_len − 1.
    assert_eq!(cut(&p, keep_end(8)), ("9".into(), "ijklmn$".into(), " xyz$".into()));
    let (_, report) = one(&p, &keep_end(8));
    assert_eq!((report.prompts_truncated, report.responses_truncated, report.longest_sequence), (1, 1, 8));
    // EOS stays (the end is kept); the default mode cuts the response's end instead.
    assert_eq!(cut(&p, Truncation::new(20)).1, " abcdefghijk");
}

/// Every kept sequence fits, in every mode, on random pairs; `keep_start` never cuts a prompt and
/// `keep_end` never cuts a response's end.
#[test]
fn every_mode_fits_max_len() {
    let mut r = rng(31);
    for _ in 0..400 {
        let word = |r: &mut ChaCha8Rng| -> String {
            (0..r.random_range(1..30)).map(|_| (b'a' + r.random_range(0..3u8)) as char).collect()
        };
        let pair = PreferencePair::new(word(&mut r), word(&mut r), word(&mut r));
        let max_len = r.random_range(2..60);
        for mode in [TruncationMode::PromptThenResponses, TruncationMode::KeepStart, TruncationMode::KeepEnd] {
            let limits = Truncation {
                mode,
                max_prompt_length: r.random_bool(0.3).then(|| r.random_range(1..20)),
                max_completion_length: r.random_bool(0.3).then(|| r.random_range(1..20)),
                ..Truncation::new(max_len)
            };
            let Some(tp) = one(&pair, &limits).0 else { continue };
            let full = one(&pair, &Truncation::new(100_000)).0.unwrap();
            for response in [&tp.chosen, &tp.rejected] {
                assert!(!tp.prompt.is_empty() && !response.is_empty() && tp.prompt.len() + response.len() <= max_len);
            }
            assert!(tp.prompt.len() <= limits.max_prompt_length.unwrap_or(usize::MAX));
            assert!(full.prompt.ends_with(&tp.prompt), "{mode:?}: the prompt keeps its end");
            match mode {
                TruncationMode::KeepStart if limits.max_prompt_length.is_none() => assert_eq!(tp.prompt, full.prompt),
                TruncationMode::KeepEnd if limits.max_completion_length.is_none() => {
                    assert!(full.chosen.ends_with(&tp.chosen) && full.rejected.ends_with(&tp.rejected))
                }
                _ => {}
            }
        }
    }
}
