//! From rust-ini's parse to raw values per key, and the problems of the file's shape: a key set
//! twice, a key outside any section, a section or key the table does not know (with the
//! closest known one, or the section a key belongs in).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::keys::{sections, KEYS};
use super::Problem;

/// The file's values, section → key → every value given (several when a key is repeated).
pub struct Reader {
    file: PathBuf,
    values: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// Keys outside any section.
    stray: Vec<String>,
    pub problems: Vec<Problem>,
}

impl Reader {
    /// Collects the values of `ini`, read from `file`.
    pub fn new(file: &Path, ini: &ini::Ini) -> Reader {
        let mut values: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        let mut stray = Vec::new();
        for (section, props) in ini.iter() {
            match section {
                None => stray.extend(props.iter().map(|(k, _)| k.to_string())),
                Some(s) => {
                    let sec = values.entry(s.trim().to_string()).or_default();
                    for (k, v) in props.iter() {
                        sec.entry(k.trim().to_string())
                            .or_default()
                            .push(v.trim().to_string());
                    }
                }
            }
        }
        Reader {
            file: file.to_path_buf(),
            values,
            stray,
            problems: Vec::new(),
        }
    }

    /// Records a problem with a key.
    pub fn problem(&mut self, section: &str, key: &str, message: String) {
        self.problems.push(Problem {
            file: self.file.clone(),
            section: section.into(),
            key: Some(key.into()),
            message,
        });
    }

    /// The value of a key, if the file sets it; a repeated key is a problem (the last wins).
    pub fn raw(&mut self, section: &str, key: &str) -> Option<String> {
        let vals = self.values.get(section)?.get(key)?.clone();
        if vals.len() > 1 {
            self.problem(
                section,
                key,
                format!(
                    "is set {} times; set it once (lists are comma-separated)",
                    vals.len()
                ),
            );
        }
        vals.into_iter().last()
    }

    /// Turns every key and section the table does not know into a problem with a suggestion.
    pub fn check_unknown(&mut self) {
        let known_sections = sections();
        let mut found = Vec::new();
        for key in &self.stray {
            found.push(Problem {
                file: self.file.clone(),
                section: String::new(),
                key: None,
                message: format!("{key:?} is outside any section; put it under its [section]"),
            });
        }
        for (section, keys) in &self.values {
            let Some(&known_section) = known_sections.iter().find(|s| **s == section.as_str())
            else {
                let suggestion = closest(section, known_sections.iter().copied())
                    .map(|s| format!("; did you mean [{s}]?"))
                    .unwrap_or_default();
                let mut all = known_sections.clone();
                all.sort_unstable();
                found.push(Problem {
                    file: self.file.clone(),
                    section: section.clone(),
                    key: None,
                    message: format!("unknown section{suggestion} (sections: {})", all.join(", ")),
                });
                continue;
            };
            let in_section = || {
                KEYS.iter()
                    .filter(move |k| k.section == known_section)
                    .map(|k| k.name)
            };
            for key in keys.keys() {
                if in_section().any(|k| k == key) {
                    continue;
                }
                let elsewhere = KEYS
                    .iter()
                    .find(|k| k.name == key)
                    .map(|k| format!("; {key} belongs in [{}]", k.section));
                let suggestion = elsewhere
                    .or_else(|| closest(key, in_section()).map(|k| format!("; did you mean {k}?")))
                    .unwrap_or_default();
                found.push(Problem {
                    file: self.file.clone(),
                    section: known_section.into(),
                    key: None,
                    message: format!("unknown key {key:?}{suggestion}"),
                });
            }
        }
        self.problems.extend(found);
    }
}

/// The closest candidate by edit distance, if it is close enough to be a plausible typo.
fn closest<'k>(word: &str, candidates: impl Iterator<Item = &'k str>) -> Option<&'k str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
