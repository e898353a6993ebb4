// Renders Ollama-style chat templates with Go's text/template (the engine Ollama uses), for the tests:
// stdin: a JSON list of {"Template": ..., "Messages": [{"Role": ..., "Content": ...}]}; stdout: a JSON list of texts.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var cases []struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("").Parse(c.Template))
		var b bytes.Buffer
		if err := t.Execute(&b, map[string]any{"Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
