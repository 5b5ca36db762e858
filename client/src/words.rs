//! Comparing transcripts word by word: the word error rate (substitutions, deletions
//! and insertions over the reference's words, after lower-casing and dropping
//! punctuation, by Levenshtein distance over words) and the word diff behind it.

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

/// One step of a word diff from a reference to a hypothesis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WordEdit {
    Same(String),
    /// In the reference only.
    Removed(String),
    /// In the hypothesis only.
    Added(String),
}

/// The shortest word diff (by the same distance as [`word_error_rate`]; a substitution
/// shows as a removal and an addition).
pub fn word_diff(reference: &str, hypothesis: &str) -> Vec<WordEdit> {
    let (r, h) = (words(reference), words(hypothesis));
    // distance[i][j]: edits from r[i..] to h[j..].
    let mut distance = vec![vec![0usize; h.len() + 1]; r.len() + 1];
    for i in (0..=r.len()).rev() {
        for j in (0..=h.len()).rev() {
            distance[i][j] = match (i == r.len(), j == h.len()) {
                (true, _) => h.len() - j,
                (_, true) => r.len() - i,
                _ if r[i] == h[j] => distance[i + 1][j + 1],
                _ => {
                    1 + distance[i + 1][j + 1]
                        .min(distance[i + 1][j])
                        .min(distance[i][j + 1])
                }
            };
        }
    }
    let (mut i, mut j, mut edits) = (0, 0, Vec::new());
    while i < r.len() || j < h.len() {
        if i < r.len() && j < h.len() && r[i] == h[j] && distance[i][j] == distance[i + 1][j + 1] {
            edits.push(WordEdit::Same(r[i].clone()));
            (i, j) = (i + 1, j + 1);
        } else if i < r.len() && j < h.len() && distance[i][j] == 1 + distance[i + 1][j + 1] {
            edits.push(WordEdit::Removed(r[i].clone()));
            edits.push(WordEdit::Added(h[j].clone()));
            (i, j) = (i + 1, j + 1);
        } else if i < r.len() && (j == h.len() || distance[i][j] == 1 + distance[i + 1][j]) {
            edits.push(WordEdit::Removed(r[i].clone()));
            i += 1;
        } else {
            edits.push(WordEdit::Added(h[j].clone()));
            j += 1;
        }
    }
    edits
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

    #[test]
    fn the_diff_shows_exactly_the_changes() {
        use WordEdit::*;
        assert_eq!(
            word_diff("send an ambulance now", "send the ambulance now please"),
            vec![
                Same("send".into()),
                Removed("an".into()),
                Added("the".into()),
                Same("ambulance".into()),
                Same("now".into()),
                Added("please".into()),
            ]
        );
        assert_eq!(
            word_diff("a b", "a b"),
            vec![Same("a".into()), Same("b".into())]
        );
        assert_eq!(word_diff("a", ""), vec![Removed("a".into())]);
    }
}
