use super::*;

#[test]
fn chatml_template_renders() {
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "Hi".into(),
    }];
    let out = render_chat(template, &msgs, "", "").unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn template_errors_are_reported() {
    let err = render_chat("{{ raise_exception('no system role') }}", &[], "", "").unwrap_err();
    assert!(err.to_string().contains("no system role"), "{err}");
    assert!(render_chat("{% for %}", &[], "", "").is_err());
}
