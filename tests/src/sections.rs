//! Output of the in-testbed check scripts: sections
//!   === NAME
//!   ...output...
//!   === NAME rc=N

use std::collections::HashMap;

/// Splits the script's output into sections: name -> (output, rc).
pub fn sections(out: &str) -> HashMap<String, (String, Option<i32>)> {
    let mut map = HashMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("=== ") {
            if let Some((name, rc)) = rest.rsplit_once(" rc=") {
                if let Some((n, text)) = cur.take() {
                    if n == name {
                        map.insert(n, (text, rc.trim().parse().ok()));
                        continue;
                    }
                }
            }
            if let Some((n, text)) = cur.take() {
                map.insert(n, (text, None));
            }
            cur = Some((rest.to_string(), String::new()));
        } else if let Some((_, text)) = cur.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Some((n, text)) = cur {
        map.insert(n, (text, None));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_parse() {
        let s = sections("noise\n=== a\nx\ny\n=== a rc=3\n=== b\nz\n=== b rc=0\n=== c\nw\n");
        assert_eq!(s["a"], ("x\ny\n".to_string(), Some(3)));
        assert_eq!(s["b"], ("z\n".to_string(), Some(0)));
        assert_eq!(s["c"], ("w\n".to_string(), None));
    }
}
