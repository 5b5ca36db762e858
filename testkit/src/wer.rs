//! Word error rate: (substitutions + deletions + insertions) / reference words, after
//! lower-casing and dropping punctuation, by Levenshtein distance over words.

/// Lower-case words with punctuation removed (apostrophes kept inside words).
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Word error rate of `hypothesis` against `reference`; 1.0 for an empty hypothesis
/// of a non-empty reference.
pub fn word_error_rate(reference: &str, hypothesis: &str) -> f64 {
    let (r, h) = (words(reference), words(hypothesis));
    if r.is_empty() {
        return if h.is_empty() { 0.0 } else { 1.0 };
    }
    let mut previous: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut current = vec![i + 1; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            let substitution = previous[j] + usize::from(rw != hw);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[h.len()] as f64 / r.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_up_to_case_and_punctuation() {
        assert_eq!(word_error_rate("The quick fox.", "the QUICK fox"), 0.0);
    }

    #[test]
    fn counts_each_kind_of_error() {
        // one substitution, one deletion, one insertion over 4 reference words
        assert_eq!(word_error_rate("a b c d", "a x c e f"), 0.75);
        assert_eq!(word_error_rate("a b c d", "a b c"), 0.25);
        assert_eq!(word_error_rate("a b", ""), 1.0);
        assert_eq!(word_error_rate("", ""), 0.0);
    }
}
