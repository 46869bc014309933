package main

import (
	"strings"
	"testing"
	"time"
)

func TestHistogramWritesCumulativeBucketsSumAndCount(t *testing.T) {
	h := newHistogram()
	for _, d := range []time.Duration{
		300 * time.Microsecond, // <= 0.0005
		500 * time.Microsecond, // on a bound: counted in it, as Prometheus' le means
		8 * time.Millisecond,   // <= 0.01
		30 * time.Second,       // beyond the last bound: +Inf only
	} {
		h.observe(d)
	}
	var b strings.Builder
	h.write(&b, "x_seconds", "help text")
	text := b.String()
	for _, line := range []string{
		"# HELP x_seconds help text",
		"# TYPE x_seconds histogram",
		`x_seconds_bucket{le="0.0005"} 2`,
		`x_seconds_bucket{le="0.0075"} 2`,
		`x_seconds_bucket{le="0.01"} 3`,
		`x_seconds_bucket{le="10"} 3`,
		`x_seconds_bucket{le="+Inf"} 4`,
		"x_seconds_sum 30.0088",
		"x_seconds_count 4",
	} {
		if !strings.Contains(text, line+"\n") {
			t.Fatalf("histogram lacks %q:\n%s", line, text)
		}
	}
}
